"""benchmarks.common: the timing helper, the table printer and the trace summariser."""

import io

import jax
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
