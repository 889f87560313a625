r"""Train-step time, tokens/s and MFU of LM recipes in float32 and bf16 (run on a GPU).

    python -m benchmarks.train_step --config=configs/lm/imdb.py:mamba \
        --config=configs/lm/imdb.py:transformer [--dtypes=float32,bfloat16] [--steps=10] \
        [--trace_dir=/tmp/trace --top=25 [--hlo_dump=/tmp/xdump]] [--set=model.num_layers=2] \
        [--constant=ssm.lti_mixer.FLAT_TOKENS=False] [--compile_only]

Each row builds the trainer as `python -m train` does (model, optimizer, the jitted
step with its fused update) for the config with model.dtype set, feeds a synthetic batch
of random bytes of the config's shape (step time does not depend on the text), and
reports the best of 3 x `--steps` pipelined steps: ms per step, tokens/s, model TFLOP/s
and MFU (train/flops.py: 6 N + the mixers' sequence terms, against the device's dense
peak for the dtype). Rows of one call are comparable; compare across calls only loosely.
--compile_only lowers and compiles the step without running it and prints the seconds of
each (on any backend: e.g. the CPU, to compare model.scan_layers against the unrolled loop).
With --trace_dir each row also traces 3 steps and prints the device time per op (printed
before its row); with --hlo_dump (and XLA_FLAGS=--xla_dump_to=that folder
--xla_dump_hlo_module_re=.*train_step.*) each listed op also gets its shapes and the
source line that made it, read off the step's optimized HLO.
"""

import time

from absl import app, flags

_CONFIGS = flags.DEFINE_multi_string("config", ["configs/lm/imdb.py:mamba"],
                                      "config file[:arg], repeated")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "model.dtype values")
_BATCH = flags.DEFINE_integer("batch_size", 0, "override train.batch_size (0: the config's)")
_STEPS = flags.DEFINE_integer("steps", 10, "steps per timing")
_TRACE = flags.DEFINE_string("trace_dir", None,
                             "also trace 3 steps per row here and print device time per op")
_TOP = flags.DEFINE_integer("top", 25, "device ops listed per traced row")
_HLO_DUMP = flags.DEFINE_string(
    "hlo_dump", None, "the folder of XLA_FLAGS=--xla_dump_to=... (set it in the environment, "
    "with --xla_dump_hlo_module_re=.*train_step.*): traced ops get their shapes and source "
    "lines from the step's optimized HLO there")
_CONSTANTS = flags.DEFINE_multi_string(
    "constant", [], "module constant MODULE.NAME=VALUE set before building (A/B runs, e.g. "
    "ssm.lti_mixer.FLAT_TOKENS=False)")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                   "only lower and compile the step; print the seconds")
_SET = flags.DEFINE_multi_string("set", [], "config override key=value (e.g. "
                                 "model.num_layers=2), applied to every config")


def _load(path_arg: str):
  import importlib.util  # noqa: PLC0415
  path, _, arg = path_arg.partition(":")
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def apply_overrides(config, overrides):
  """config with each "a.b=value" applied (value parsed as a Python literal when it is
  one, else kept as a string); a key the config lacks is a KeyError."""
  import ast  # noqa: PLC0415
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for item in overrides:
      key, sep, raw = item.partition("=")
      if not sep:
        raise ValueError(f"--set {item!r}: expected key=value")
      *parents, leaf = key.split(".")
      node = config
      for part in parents:
        node = node[part]
      if leaf not in node:
        raise KeyError(f"--set {item!r}: the config has no {key}")
      try:
        value = ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        value = raw
      node[leaf] = value
  return config


def time_step(config, dtype: str, batch_size: int, steps: int, trace_dir: str | None = None,
              top: int = 25, hlo_dump: str | None = None, compile_only: bool = False) -> dict:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from data.lm import BYTE_VOCAB_SIZE  # noqa: PLC0415
  from data.task import TaskSpec  # noqa: PLC0415
  from train import flops as flops_lib  # noqa: PLC0415
  from train import sharding as sharding_lib  # noqa: PLC0415
  from train.trainer import Trainer  # noqa: PLC0415

  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dtype = dtype
    if batch_size:
      config.train.batch_size = batch_size
  seq_len = int(config.data.seq_len)
  task = TaskSpec(name="lm", kind="lm", input_kind="tokens", seq_len=seq_len,
                  num_classes=BYTE_VOCAB_SIZE, vocab_size=BYTE_VOCAB_SIZE)
  mesh = sharding_lib.make_mesh(config.train.mesh)
  trainer = Trainer(config, task, mesh)
  b = config.train.batch_size
  rng = np.random.default_rng(0)
  ids = rng.integers(2, BYTE_VOCAB_SIZE, (b, seq_len + 1)).astype(np.int32)
  batch = dict(inputs=ids[:, :-1], targets=ids[:, 1:], mask=np.ones((b, seq_len), bool),
               weights=np.ones((b,), np.float32))
  if config.data.get("segment_ids"):
    batch["segment_ids"] = np.cumsum(ids[:, :-1] == 5, axis=1).astype(np.int32)
  batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
  state, rngs = trainer.init_state()
  if compile_only:
    t = time.perf_counter()
    lowered = trainer._train_step_jit.lower(state, rngs, batch,  # noqa: SLF001
                                            trainer.stop_flags(False))
    lower_s = time.perf_counter() - t
    lowered.compile()
    return dict(lower_s=lower_s, compile_s=time.perf_counter() - t - lower_s,
                params=sum(x.size for x in jax.tree.leaves(state.params)))

  def run(n):
    nonlocal state
    for _ in range(n):
      state, out = trainer.train_step(state, rngs, batch)
    jax.block_until_ready(out)
    return out

  t = time.perf_counter()
  run(1)
  compile_s = time.perf_counter() - t
  run(2)
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    out = run(steps)
    best = min(best, (time.perf_counter() - t) / steps)
  if trace_dir:
    from benchmarks.common import optimized_hlo, summarise_trace  # noqa: PLC0415
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      run(3)
    summarise_trace(trace_dir, 3, top, hlo_text=optimized_hlo(hlo_dump))
  tokens_per_s = b * seq_len / best
  mfu = flops_lib.mfu(tokens_per_s, trainer.flops_per_token, dtype=dtype)
  return dict(step_ms=1e3 * best, tokens_per_s=tokens_per_s, compile_s=compile_s,
              tflops=tokens_per_s * trainer.flops_per_token / 1e12, mfu=mfu,
              loss=float(out["loss"]), finite=bool(out["finite"]),
              params=sum(x.size for x in jax.tree.leaves(state.params)))


def main(argv):
  del argv
  import jax  # noqa: PLC0415

  from benchmarks.common import set_constants  # noqa: PLC0415
  set_constants(_CONSTANTS.value)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
  print(f"{'config':34} {'dtype':9} {'params':>7} {'batch':>9} {'ms/step':>8} "
        f"{'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'loss':>7} {'compile s':>9}")
  for path in _CONFIGS.value:
    config = apply_overrides(_load(path), _SET.value)
    for dtype in _DTYPES.value:
      try:
        trace = _TRACE.value and f"{_TRACE.value}/{path.split(':')[-1]}_{dtype}"
        r = time_step(config, dtype, _BATCH.value, _STEPS.value, trace, _TOP.value,
                      _HLO_DUMP.value, _COMPILE_ONLY.value)
      except Exception as e:  # noqa: BLE001 (a row that fails says why; the others run)
        print(f"{path:34} {dtype:9} FAILED: {type(e).__name__}: {str(e)[:300]}")
        continue
      if _COMPILE_ONLY.value:
        print(f"{path.split('/')[-1]:34} {dtype:9} {r['params'] / 1e6:6.1f}M  lower "
              f"{r['lower_s']:6.1f} s  compile {r['compile_s']:6.1f} s", flush=True)
        continue
      mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
      shape = f"{config.train.batch_size if not _BATCH.value else _BATCH.value}x{config.data.seq_len}"
      print(f"{path.split('/')[-1]:34} {dtype:9} {r['params'] / 1e6:6.1f}M {shape:>9} "
            f"{r['step_ms']:8.2f} {r['tokens_per_s']:10,.0f} {r['tflops']:8.1f} {mfu:>6} "
            f"{r['loss']:7.3f}{'' if r['finite'] else ' NONFINITE'} {r['compile_s']:9.1f}",
            flush=True)


if __name__ == "__main__":
  app.run(main)
