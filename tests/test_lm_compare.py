"""scripts/lm_compare.py end to end on a tiny corpus: train, table, samples, decoding state.

One module-scoped run trains s4d (recurrent) and the transformer (KV cache) for two steps
at size "tiny" and measures decoding at contexts 64 and 256; the tests read its outputs.
"""

import json
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

from data import lm
from scripts import lm_compare

# One xdist worker runs this module: its tests share a module-scoped trained run.
pytestmark = pytest.mark.xdist_group("lm_compare")


MODELS = ("s4d", "transformer")
CONTEXTS = (64, 256)


def corpus(path: pathlib.Path) -> pathlib.Path:
  text = "\n\n".join(f"Para {i}: " + "abc " * (1 + i % 5) + f"done.\nLine {i}." for i in range(40))
  path.write_text(text)
  return path


def cli_args(out, data_path, models=MODELS):
  return [f"--out={out}", f"--models={','.join(models)}", "--size=tiny", "--num_steps=2",
          f"--contexts={','.join(map(str, CONTEXTS))}", "--decode_steps=8", "--warmup_steps=2",
          "--gen_tokens=24", "--prompt_tokens=12", f"--data_path={data_path}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("lm_compare")
  data_path = corpus(root / "corpus.txt")
  out = root / "out"
  report = lm_compare.main(cli_args(out, data_path))
  return report, out, data_path


@pytest.mark.slow  # ~40-80 s on 2 shared CPU cores: two trainings and ~10 compilations each
def test_table_json_and_samples(run):
  report, out, _ = run
  table = (out / "lm_table.md").read_text()
  saved = json.loads((out / "lm_compare.json").read_text())
  assert saved["rows"] == json.loads(json.dumps(report["rows"]))
  assert ("| model | params | tokens trained | val bpb | test bpb | best val bpb (step) "
          "| train tokens/s | MFU | dtype |") in table
  assert "ms/token @256 | scan ms/token @64 | scan ms/token @256 | constant state |" in table
  assert "state bytes @64 | state bytes @256 | ms/token @64 | ms/token @256" in table
  assert "Device: cpu" in table
  rows = {r["model"]: r for r in report["rows"]}
  assert list(rows) == list(MODELS)
  for name, r in rows.items():
    assert any(line.startswith(f"| {name} | {r['params']:,} |") for line in table.splitlines())
    assert r["trained_now"] and r["steps"] == 2
    assert r["tokens_trained"] == 2 * 4 * 32  # steps x batch x seq_len of the tiny config
    assert 0 < r["val_bpb"] < 20 and 0 < r["test_bpb"] < 20
    assert r["train_tokens_per_s"] > 0
    assert r["dtype"] == "float32" and r["train_mfu"] is None  # no peak FLOP/s for a CPU
    if r["best_val_bpb"] is not None:  # logged only when the run evaluated before its end
      assert r["best_val_bpb"] > 0 and 0 < r["best_val_step"] <= 2
    for c in CONTEXTS:
      d = r["decode"][str(c)]
      assert d["ms_per_token"] > 0 and d["scan_ms_per_token"] > 0
      assert d["prefill_tokens"] == c - 2 - 2 * 8
    sample = (out / name / "sample.txt").read_text(errors="surrogateescape")
    assert "--- prompt ---" in sample and "--- sample ---" in sample
    assert r["prompt"].startswith("Para ")  # the validation split's first document


@pytest.mark.slow
def test_recurrent_state_is_constant_and_kv_cache_grows(run):
  report, out, _ = run
  rows = {r["model"]: r for r in report["rows"]}
  s4d = [rows["s4d"]["decode"][str(c)]["state_bytes"] for c in CONTEXTS]
  # S4D: one complex64 state of d_state / 2 per channel: d_model 16, d_state 4 (tiny).
  assert s4d == [16 * 2 * 8] * 2 and rows["s4d"]["constant_state"]
  att = [rows["transformer"]["decode"][str(c)]["state_bytes"] for c in CONTEXTS]
  # KV cache: k and v of (1, C, heads x head_dim = 16) float32, plus the int32 position.
  assert att == [2 * c * 16 * 4 + 4 for c in CONTEXTS]
  assert not rows["transformer"]["constant_state"]
  lines = {line.split(" | ")[0][2:]: line for line in (out / "lm_table.md").read_text().splitlines()
           if line.startswith("| ")}
  assert lines["s4d"].endswith("| yes |") and lines["transformer"].endswith("| no (grows) |")


@pytest.mark.slow
def test_rerun_reuses_the_trained_runs(run):
  _, out, data_path = run
  for name in MODELS:
    config = lm_compare.model_config(name, "tiny", 2, str(data_path))
    before = (out / name / "metrics.jsonl").read_text()
    results, trained = lm_compare.train_model(config, out / name)
    assert not trained and results["steps"] == 2
    assert (out / name / "metrics.jsonl").read_text() == before


def test_prefill_matches_the_parallel_forward():
  """Stepping through a prompt gives the parallel forward's next-token logits."""
  import models
  from configs.lm import shakespeare
  from data.task import TaskSpec
  config = shakespeare.get_config("lightning,tiny")  # the family the end-to-end run skips
  task = TaskSpec(name="lm", kind="lm", input_kind="tokens", seq_len=32, num_classes=258,
                  vocab_size=258)
  model = models.build_model(config.model, task, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(2, 258, size=(2, 20)).astype(np.int32)
  state, logits = lm_compare.prefill(model, tokens)
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)({"inputs": x}, deterministic=True))
  want = forward(params, tokens)[:, -1]
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
  assert lm_compare.tree_nbytes(state) == sum(x.nbytes for x in jax.tree.leaves(state))


@pytest.mark.parametrize("argv, match", [
    (["--models=mamba,gpt"], r"unknown model\(s\) \['gpt'\]"),
    (["--models=s4d,s4d"], "twice"),
    (["--contexts=1k,big"], r"'big' is not a positive int"),
    (["--contexts=0"], "not a positive int"),
    (["--contexts=100"], "must exceed warmup_steps"),
    (["--size=huge"], "unknown --size"),
    (["--recipes=wiki"], "unknown --recipes='wiki'"),
    (["--recipes=imdb", "--models=s4d"], r"unknown model\(s\) \['s4d'\]"),
    (["--recipes=imdb", "--size=long"], "unknown --size='long' for --recipes=imdb"),
    (["--dtype=float16"], "unknown --dtype='float16'"),
])
def test_bad_arguments_fail_clearly(argv, match, capsys, tmp_path):
  with pytest.raises(SystemExit):
    lm_compare.main([f"--out={tmp_path}"] + argv)
  assert re.search(match, capsys.readouterr().err)
  assert not list(tmp_path.iterdir())  # nothing trained


def test_imdb_recipes_and_dtype_override():
  """--recipes=imdb builds configs/lm/imdb.py's recipe; --dtype overrides model.dtype."""
  from configs.lm import imdb
  config = lm_compare.model_config("mamba2", "tiny", 3, None, "imdb", "float32")
  assert config.model.dtype == "float32" and config.train.num_steps == 3
  assert config.data.path == imdb.get_config("mamba2,tiny").data.path
  assert lm_compare.model_config("mamba2", "tiny", 3, None, "imdb").model.dtype == "bfloat16"


def test_parse_contexts_and_labels():
  assert lm_compare.parse_contexts("16k, 1024") == [1024, 16384]
  assert [lm_compare.context_label(c) for c in (1024, 16384, 300)] == ["1k", "16k", "300"]
  with pytest.raises(ValueError, match="twice"):
    lm_compare.parse_contexts("1k,1024")


def test_detokenize_shows_documents_as_paragraphs():
  ids = np.concatenate([[lm.SEP_ID], lm.ByteTokenizer().encode("ab"), [lm.SEP_ID],
                        lm.ByteTokenizer().encode("c")])
  assert lm_compare.detokenize(ids, "byte") == "ab\n\nc"
  assert lm_compare.detokenize(ids[:2], "char") == f"{lm.SEP_ID} {ord('a') + 2}"
