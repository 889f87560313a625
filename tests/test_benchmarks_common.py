"""benchmarks.common: the timing helper, the table printer and the trace summariser."""

import io

import jax
import jax.numpy as jnp
import pytest

from benchmarks import common
from benchmarks.common import format_table, print_table, time_fn


def test_time_fn_calls_warmup_plus_iters_and_returns_median():
  calls = []
  t = time_fn(lambda x: calls.append(x) or x, 1.0, warmup=2, iters=5)
  assert len(calls) == 7 and t >= 0.0
  with pytest.raises(ValueError, match="iters"):
    time_fn(lambda: None, iters=0)


def test_table_aligns_numbers_right_and_text_left():
  rows = [{"layer": "s4d", "L": 1024, "ms": 1.23456}, ("sgconv", 16384, None)]
  lines = format_table(rows, ["layer", "L", "ms"]).splitlines()
  assert lines[0].split() == ["layer", "L", "ms"]
  assert set(lines[1].replace(" ", "")) == {"-"}
  assert lines[2].startswith("s4d    ") and lines[2].endswith("1.235")
  assert lines[3].startswith("sgconv") and lines[3].endswith("-")
  assert len({len(line) for line in lines[:2]}) == 1  # header and rule have one width
  assert lines[2].index("1024") + 4 == lines[3].index("16384") + 5  # right-aligned ints


def test_print_table_title_and_bad_row():
  out = io.StringIO()
  print_table([[1, "a"]], ["n", "s"], title="T", file=out)
  assert out.getvalue().splitlines()[0] == "T"
  with pytest.raises(ValueError, match="has 3 cells, expected 2"):
    format_table([[1, 2, 3]], ["n", "s"])


def test_summarise_trace_sums_device_time_per_op(tmp_path, capsys):
  """A profiler trace of a jitted function: the summary names the device time per step and
  lists ops with their share; an empty folder says so instead of failing."""
  import jax.numpy as jnp  # noqa: PLC0415
  f = jax.jit(lambda x: jnp.sin(x) @ x.T)
  x = jnp.ones((64, 64))
  jax.block_until_ready(f(x))
  with jax.profiler.trace(str(tmp_path / "trace"), create_perfetto_trace=True):
    jax.block_until_ready([f(x) for _ in range(2)])
  common.summarise_trace(str(tmp_path / "trace"), 2, top=5)
  out = capsys.readouterr().out
  assert "ms per step (summed over streams)" in out
  rows = [line for line in out.splitlines() if "%" in line]
  assert 1 <= len(rows) <= 5
  assert all(float(line.split()[0]) >= 0 for line in rows)
  common.summarise_trace(str(tmp_path / "empty"), 2)
  assert "no perfetto_trace.json.gz under" in capsys.readouterr().out


def test_hlo_op_summaries_name_shapes_and_source_lines():
  def inner(x, w):
    return jnp.tanh(x @ w)

  fn = jax.jit(lambda x, w: inner(x, w).T * 2 + 1)
  text = fn.lower(jnp.ones((64, 32)), jnp.ones((32, 48))).compile().as_text()
  import re
  names = re.findall(r"^\s*ROOT %?([\w.\-]+) = ", text, re.M)
  entry_root = names[-1]                  # the step's output op, as a trace would name it
  notes = common.hlo_op_summaries(text, [entry_root.replace(".", "_"), "no_such_op"])
  assert "no_such_op" not in notes
  (note,) = notes.values()
  assert note.startswith("f32[48,64]")
  assert "test_benchmarks_common.py:" in note


def test_train_step_config_overrides():
  from benchmarks.train_step import _load, apply_overrides
  config = _load("configs/lm/imdb.py:mamba2")
  out = apply_overrides(config, ["model.num_layers=2", "data.seq_len=256"])
  assert (out.model.num_layers, out.data.seq_len) == (2, 256)
  assert config.model.num_layers == 24                        # the original is untouched
  with pytest.raises(KeyError, match="no model.nonsense"):
    apply_overrides(config, ["model.nonsense=1"])
  with pytest.raises(ValueError, match="key=value"):
    apply_overrides(config, ["model.num_layers"])
