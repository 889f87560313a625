"""The MQAR sweep runner (scripts/mqar_suite.py sweep) on CPU: one tiny cell with two
learning rates vmapped, its result files, per-cell resume, the protocol check, the plan,
replicas independent of each other, and the plotting helper."""

import json
import os

import numpy as np
import pytest

from configs import mqar
from scripts import mqar_suite

# One cell: lightning with gated residual memory, segments of 8 tokens, 2 lrs, 3 steps.
GRID = dict(mqar.SWEEP_QUICK, mixers=("lightning",), caching=("grm",), num_steps=3)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  return workdir, mqar_suite.run_sweep(GRID, workdir, log=lambda *_: None)


def test_grid_cells():
  cells = mqar_suite.sweep_cells(dict(mqar.SWEEP))
  # attention: no caching; 4 recurrent mixers x (none + 2 caching x 2 segment sizes);
  # 3 widths x 2 lengths x 3 pair counts each.
  assert len(cells) == (1 + 4 * 5) * 3 * 2 * 3
  assert len({c.program for c in cells}) == (1 + 4 * 5) * 3 * 2
  assert {c.variant for c in cells if c.mixer == "transformer"} == {"transformer"}
  assert "mamba2+ssc64" in {c.variant for c in cells}
  assert all(len(mqar.SWEEP["lrs"]) >= 4 and 1e-4 <= lr <= 1e-2 for lr in mqar.SWEEP["lrs"])


def test_sweep_writes_one_row_per_cell(swept):
  workdir, out = swept
  assert out["ran"] == ["lightning_grm8_d16_L32_kv4"] and out["skipped"] == []
  assert os.path.exists(os.path.join(workdir, "results.md"))
  with open(os.path.join(workdir, "results.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 1
  row = rows[0]
  assert row["variant"] == "lightning+grm8" and row["segment_size"] == 8
  assert (row["d_model"], row["seq_len"], row["num_kv_pairs"]) == (16, 32, 4)
  assert row["lrs"] == [1e-3, 1e-2] and len(row["accuracy"]) == 2
  assert all(0.0 <= a <= 1.0 for a in row["accuracy"])
  assert row["best_lr"] in row["lrs"]
  assert row["best_accuracy"] == max(row["accuracy"])
  assert row["steps"] == 3 and row["replicas"] == 2
  assert row["step_time_s"] > 0 and row["params"] > 0
  assert row["state_bytes"] > 0 and all(np.isfinite(row["final_train_loss"]))
  with open(os.path.join(workdir, "sweep.json")) as f:
    assert json.load(f)["lrs"] == [1e-3, 1e-2]


def test_rerun_skips_done_cells_and_refuses_another_protocol(swept):
  workdir, first = swept
  again = mqar_suite.run_sweep(GRID, workdir, log=lambda *_: None)
  assert again["ran"] == [] and again["skipped"] == first["ran"]
  assert again["rows"] == first["rows"]
  p = mqar_suite.plan(GRID, workdir)
  assert (p["cells"], p["done"], p["todo"]) == (1, 1, 0)
  with pytest.raises(ValueError, match="another protocol"):
    mqar_suite.run_sweep(dict(GRID, lrs=(1e-3,)), workdir)


def test_replicas_are_independent(swept, tmp_path):
  """The lr-1e-3 replica trained alone gives the same result as inside the 2-lr vmap."""
  _, both = swept
  alone = mqar_suite.run_sweep(dict(GRID, lrs=(1e-3,)), str(tmp_path), log=lambda *_: None)
  a, b = alone["rows"][0], both["rows"][0]
  np.testing.assert_allclose(a["final_train_loss"][0], b["final_train_loss"][0], rtol=1e-5)
  np.testing.assert_allclose(a["test_loss"][0], b["test_loss"][0], rtol=1e-5)


def test_a_stopped_cell_resumes_from_its_checkpoint(swept, tmp_path):
  """Stopped after 2 of 3 steps, the cell leaves a checkpoint and no row; the rerun
  continues at step 2 and ends where the uninterrupted run did."""
  workdir = str(tmp_path)
  lines = []
  first = mqar_suite.run_sweep(GRID, workdir, halt_at_step=2, log=lines.append)
  assert first["ran"] == [] and first["stopped"] == ["lightning_grm8_d16_L32_kv4"]
  # the log says how far it got and what the rest would take
  assert any("stopped at step 2 of 3," in line and "s more" in line for line in lines), lines
  assert os.path.exists(os.path.join(workdir, "cells", "lightning_grm8_d16_L32_kv4.ckpt.npz"))
  second = mqar_suite.run_sweep(GRID, workdir, log=lambda *_: None)
  assert second["ran"] == first["stopped"]
  assert os.listdir(os.path.join(workdir, "cells")) == ["lightning_grm8_d16_L32_kv4.json"]
  resumed, whole = second["rows"][0], swept[1]["rows"][0]
  assert resumed["resumed_at_step"] == 2
  np.testing.assert_allclose(resumed["final_train_loss"], whole["final_train_loss"], rtol=1e-5)
  np.testing.assert_allclose(resumed["accuracy"], whole["accuracy"], atol=1e-6)


def test_batches_are_a_function_of_the_step():
  a = [mqar_suite.batch_indices(s, 10, 3, 0) for s in range(6)]
  assert all(len(x) == 3 for x in a)
  assert len(set(np.concatenate(a[:3]))) == 9  # one epoch: distinct rows
  np.testing.assert_array_equal(a[4], mqar_suite.batch_indices(4, 10, 3, 0))
  with pytest.raises(ValueError, match="smaller than batch_size"):
    mqar_suite.batch_indices(0, 2, 3, 0)


def test_plot_sweep_and_table():
  rows = [dict(variant=v, d_model=d, seq_len=length, num_kv_pairs=16, best_lr=1e-3,
               best_accuracy=acc, step_time_s=0.01, state_bytes=d * 1024 * (2 if "+" in v else 1))
          for v, acc in (("mamba", 0.2), ("mamba+grm32", 0.5))
          for d in (64, 128) for length in (256, 512)]
  fig = mqar_suite.plot_sweep(rows)
  axes = fig.axes
  assert len(axes) == 4  # (vs d_model, vs state bytes) x 2 lengths
  assert [len(ax.get_lines()) for ax in axes] == [2, 2, 2, 2]
  assert axes[0].get_title() == "L=256, 16 pairs"
  table = mqar_suite.best_table(rows)
  assert table.count("\n") == 1 + len(rows) and "mamba+grm32" in table


def test_plot_sweep_styles_follow_the_variant_on_a_partial_grid():
  """A variant missing from one panel does not shift the others' colors; a caching
  variant has its base model's color, another dash, and follows it in the one figure
  legend; the d_model ticks are the widths present; a pair count absent is refused."""
  def row(v, d, length, acc):
    return dict(variant=v, d_model=d, seq_len=length, num_kv_pairs=16, best_accuracy=acc,
                state_bytes=1024 * d)
  rows = [row("transformer", 64, 256, 1.0), row("mamba+ssc32", 64, 256, 0.3),
          row("mamba", 64, 256, 0.2), row("mamba", 128, 256, 0.4), row("mamba", 64, 512, 0.1)]
  fig = mqar_suite.plot_sweep(rows)
  top_256, top_512 = fig.axes[0], fig.axes[1]
  style = {ln.get_label(): (ln.get_color(), ln.get_linestyle(), ln.get_marker())
           for ln in top_256.get_lines()}
  assert [ln.get_label() for ln in top_512.get_lines()] == ["mamba"]
  assert top_512.get_lines()[0].get_color() == style["mamba"][0]
  assert style["mamba+ssc32"][0] == style["mamba"][0] != style["transformer"][0]
  assert style["mamba+ssc32"][1:] != style["mamba"][1:]
  (legend,) = fig.legends
  assert [t.get_text() for t in legend.get_texts()] == ["transformer", "mamba", "mamba+ssc32"]
  assert list(top_256.get_xticks()) == [64, 128]
  with pytest.raises(ValueError, match="num_kv_pairs=32"):
    mqar_suite.plot_sweep(rows, num_kv_pairs=32)


def test_query_positions_pad_short_rows():
  mask = np.array([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
  pos, valid = mqar_suite.query_positions(mask)
  np.testing.assert_array_equal(pos[0], [1, 3, 4])
  np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  assert pos.dtype == np.int32
  pos, valid = mqar_suite.query_positions(mask, 4)
  np.testing.assert_array_equal(pos[:, :3][valid[:, :3]], [1, 3, 4, 0])
  assert pos.shape == (3, 4) and valid.sum() == 4
  with pytest.raises(ValueError, match="2 slots < 3 queries"):
    mqar_suite.query_positions(mask, 2)
  with pytest.raises(ValueError, match="6 slots > sequence length 5"):
    mqar_suite.query_positions(mask, 6)


def test_cells_of_one_program_share_one_compiled_step(tmp_path):
  """num_kv_pairs changes no shapes (the query slots are padded to the grid's largest
  count), so two pair counts of one program train on one compilation."""
  grid = dict(GRID, num_kv_pairs=(2, 4), num_steps=2, lrs=(1e-3,))
  out = mqar_suite.run_sweep(grid, str(tmp_path), log=lambda *_: None)
  assert len(out["ran"]) == 2
  (program,) = mqar_suite._LIVE_PROGRAM.values()  # noqa: SLF001
  assert program.train_step._cache_size() == 1  # noqa: SLF001


def test_query_loss_equals_the_full_logits_loss():
  """The head at the query positions only gives the full-logit loss, accuracy and gradients
  (only masked positions count in either). float32: the loss casts logits to it."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import models
  from train import metrics as metrics_lib

  cell = mqar_suite.sweep_cells(GRID)[0]
  config = mqar_suite.cell_config(cell, GRID)
  task, _ = mqar_suite.load_task_spec(config)
  arrays = mqar_suite._mqar_arrays(config, "test")
  assert arrays["query_mask"].all() and arrays["query_pos"].shape[1] == cell.num_kv_pairs
  # padded to more slots than queries, as the sweep pads every cell to its largest count
  padded = mqar_suite._mqar_arrays(config, "test", cell.num_kv_pairs + 3)
  assert padded["query_pos"].shape[1] == cell.num_kv_pairs + 3
  assert (padded["query_mask"].sum(axis=1) == cell.num_kv_pairs).all()
  batch = {k: jnp.asarray(v[:6]) for k, v in arrays.items()}
  batch_padded = {k: jnp.asarray(v[:6]) for k, v in padded.items()}
  model = models.build_model(config.model, task, rngs=nnx.Rngs(params=3, dropout=4))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def full(p):
    logits = nnx.merge(graphdef, p, rest)(batch, deterministic=True)
    return metrics_lib.loss_sums(logits, batch, "lm")

  def query(p):
    return mqar_suite.query_loss_sums(nnx.merge(graphdef, p, rest), batch)

  a, b = jax.jit(full)(params), jax.jit(query)(params)
  c = jax.jit(lambda p: mqar_suite.query_loss_sums(nnx.merge(graphdef, p, rest),
                                                   batch_padded))(params)
  for k in ("loss_sum", "correct", "weight"):
    np.testing.assert_allclose(b[k], a[k], rtol=1e-6)
    np.testing.assert_allclose(c[k], a[k], rtol=1e-6)
  ga = jax.jit(jax.grad(lambda p: full(p)["loss_sum"]))(params)
  gb = jax.jit(jax.grad(lambda p: query(p)["loss_sum"]))(params)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(y, x, rtol=2e-5, atol=1e-6 * float(np.abs(x).max()))


def test_the_next_program_compiled_ahead_trains_the_same(swept, tmp_path):
  """Two programs (widths 8 and 16): the second one's step is compiled in a worker thread
  while the first trains, and its cell's numbers equal the fixture's run of the same cell,
  whose step compiled at its first call."""
  ahead = mqar_suite.run_sweep(dict(GRID, d_models=(8, 16)), str(tmp_path),
                               log=lambda *_: None)
  first, second = sorted(ahead["rows"], key=lambda r: r["d_model"])  # the order they ran
  assert first["d_model"] == 8 and not first["precompiled"] and first["compile_s"] is None
  assert second["precompiled"] and second["compile_s"] > 0
  (plain,) = swept[1]["rows"]
  assert plain["cell"] == second["cell"] and not plain["precompiled"]
  np.testing.assert_allclose(second["final_train_loss"], plain["final_train_loss"], rtol=1e-6)
  np.testing.assert_allclose(second["accuracy"], plain["accuracy"], atol=1e-7)


def test_a_failed_compile_ahead_falls_back_to_compiling_in_place(tmp_path, monkeypatch,
                                                                  capsys):
  grid = dict(GRID, caching=("none",), d_models=(8, 16), num_steps=1, lrs=(1e-3,))

  def broken(config, grid, packed=1):
    raise RuntimeError("out of memory (simulated)")

  monkeypatch.setattr(mqar_suite, "_prepared_program", broken)
  out = mqar_suite.run_sweep(grid, str(tmp_path), log=lambda *_: None)
  assert len(out["ran"]) == 2 and not any(r["precompiled"] for r in out["rows"])
  assert "ahead failed (RuntimeError: out of memory (simulated))" in (
      capsys.readouterr().err)


PAIRS = dict(GRID, num_kv_pairs=(2, 4), num_steps=3)


@pytest.fixture(scope="module")
def pairs_alone(tmp_path_factory):
  return mqar_suite.run_sweep(PAIRS, str(tmp_path_factory.mktemp("alone")),
                              log=lambda *_: None)


def _same_rows(got, want):
  assert [r["cell"] for r in got] == [r["cell"] for r in want]
  for a, b in zip(got, want):
    np.testing.assert_allclose(a["final_train_loss"], b["final_train_loss"], rtol=1e-5)
    np.testing.assert_allclose(a["test_loss"], b["test_loss"], rtol=1e-5)
    np.testing.assert_allclose(a["accuracy"], b["accuracy"], atol=1e-6)


def test_packed_pair_counts_train_as_each_cell_alone(pairs_alone, tmp_path):
  """--pack_pairs: the two pair counts of one program in one vmapped step (2 x 2 replicas)
  give each cell's rows as trained alone, from one compilation."""
  packed = mqar_suite.run_sweep(dict(PAIRS, pack_pairs=True), str(tmp_path),
                                log=lambda *_: None)
  assert len(packed["ran"]) == 2 and all(r["packed"] == 2 for r in packed["rows"])
  assert all(r["packed"] == 1 and r["replicas"] == 2 for r in pairs_alone["rows"])
  (program,) = mqar_suite._LIVE_PROGRAM.values()  # noqa: SLF001
  assert program.train_step._cache_size() == 1  # noqa: SLF001
  _same_rows(packed["rows"], pairs_alone["rows"])
  p = mqar_suite.plan(PAIRS, str(tmp_path))
  assert (p["done"], p["todo"]) == (2, 0)


def test_a_stopped_packed_group_resumes_as_one(pairs_alone, tmp_path):
  grid = dict(PAIRS, pack_pairs=True)
  first = mqar_suite.run_sweep(grid, str(tmp_path), halt_at_step=2, log=lambda *_: None)
  assert first["ran"] == [] and len(first["stopped"]) == 2
  assert os.listdir(tmp_path / "cells") == ["lightning_grm8_d16_L32_kv2-4.ckpt.npz"]
  second = mqar_suite.run_sweep(grid, str(tmp_path), log=lambda *_: None)
  assert sorted(second["ran"]) == sorted(first["stopped"])
  assert all(r["resumed_at_step"] == 2 for r in second["rows"])
  _same_rows(second["rows"], pairs_alone["rows"])


def test_probe_times_each_variant_and_skips_what_the_sweep_lacks(capsys):
  """scripts/gpu/mqar_probe.py on the quick grid: a row per (variant, R), attention with
  caching skipped (the sweep has no such cell)."""
  from scripts.gpu import mqar_probe
  rows = mqar_probe.main(["--quick", "--mixers=transformer,lightning", "--caching=grm",
                          "--d_models=16", "--seq_len=32", "--replicas=2", "--steps=2",
                          "--segment_size=8"])
  assert [r["variant"] for r in rows] == ["lightning+grm8"]
  assert all(r["ms_per_step"] > 0 and r["replicas"] == 2 for r in rows)
  assert "transformer+grm: not in the sweep (skipped)" in capsys.readouterr().out
