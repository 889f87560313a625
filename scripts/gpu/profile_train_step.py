r"""Time one config's train step and list where the device time goes (run on a GPU).

    python scripts/gpu/profile_train_step.py --config=configs/lra/listops.py:s4d \
        --config.data.num_train=2000 [--steps=20] [--trace_dir=/tmp/trace] [--top=25] \
        [--bank_method=pairs|fft|irfft] [--s4d_vandermonde=blocked|plain] [--hlo_dump=DIR] \
        [--set=models.heads.ONE_HOT_GRAD_MAX_VOCAB=0,ssm.ops.fft_conv.BANK_METHOD=fft]

Builds the trainer exactly as `python -m train` does (same model, optimizer, jitted
step), takes one batch from the training loader, and reports:
  * the train step, pipelined (`--steps` steps queued, waited once), and the eval step;
  * with --trace_dir: a jax.profiler trace of 5 steps, whose Perfetto export is summed
    per device op name (ms per step, share of the device time), the top `--top` printed;
    with --hlo_dump as well (and XLA_FLAGS="--xla_dump_to=DIR
    --xla_dump_hlo_module_re=.*train_step.*"), each op's shapes and source line.
"""

import time

from absl import app, flags
from ml_collections import config_flags

from benchmarks.common import optimized_hlo, set_constants, summarise_trace

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:arg]",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "steps per timing")
_TRACE = flags.DEFINE_string("trace_dir", None, "write a profiler trace here and summarise it")
_TOP = flags.DEFINE_integer("top", 25, "device ops listed from the trace")
_BANK = flags.DEFINE_enum("bank_method", None, ["pairs", "fft", "irfft"],
                          "the LTI layers' bank method (ssm.ops.fft_conv.BANK_METHOD)")
_HLO = flags.DEFINE_string(
    "hlo_dump", None, "the folder of XLA_FLAGS=--xla_dump_to=... (with "
    "--xla_dump_hlo_module_re=.*train_step.*): traced ops get shapes and source lines")
_VANDER = flags.DEFINE_enum("s4d_vandermonde", None, ["blocked", "plain"],
                            "how S4D generates its kernel (ssm.s4d.VANDERMONDE)")
_SET = flags.DEFINE_list(
    "set", [], "module constants to set before tracing, for A/B runs: MODULE.NAME=VALUE,... "
    "(VALUE a Python literal, else a string); the constant must exist")


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel

  import data  # pylint: disable=import-outside-toplevel
  from data.pipeline import make_loader  # pylint: disable=import-outside-toplevel
  from train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from train.trainer import Trainer, validate_config  # pylint: disable=import-outside-toplevel

  if _BANK.value:
    import importlib  # pylint: disable=import-outside-toplevel
    # the module (ssm.ops re-exports the function fft_conv under the same name)
    importlib.import_module("ssm.ops.fft_conv").BANK_METHOD = _BANK.value
  if _VANDER.value:
    from ssm import s4d  # pylint: disable=import-outside-toplevel
    s4d.VANDERMONDE = _VANDER.value
  set_constants(_SET.value)
  config = _CONFIG.value
  validate_config(config)
  mesh = sharding_lib.make_mesh(config.train.mesh)
  task, splits = data.load_task(config.data)
  trainer = Trainer(config, task, mesh)
  bs = sharding_lib.per_host_batch(config.train.batch_size, mesh)
  batch = next(iter(make_loader(splits["train"], batch_size=bs, shuffle=False, seed=0,
                                drop_remainder=True, prefetch=0)))
  state, rngs = trainer.init_state()
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"{jax.devices()[0].device_kind}; task {task.name} seq_len {task.seq_len}; "
        f"batch {bs}; {n_params:,} parameters")

  def run(n):
    nonlocal state
    for _ in range(n):
      state, out = trainer.train_step(state, rngs, batch)
    jax.block_until_ready(out)

  t = time.perf_counter()
  run(1)
  print(f"compile + first step: {time.perf_counter() - t:.1f} s")
  run(3)
  times = []
  for _ in range(3):
    t = time.perf_counter()
    run(_STEPS.value)
    times.append((time.perf_counter() - t) / _STEPS.value)
  print(f"train step: {1e3 * min(times):.2f} ms (best of 3 x {_STEPS.value} pipelined steps), "
        f"{bs / min(times):,.0f} examples/s")
  jax.block_until_ready(trainer.eval_step(state.params, state.rest, rngs, batch))
  t = time.perf_counter()
  for _ in range(_STEPS.value):
    sums = trainer.eval_step(state.params, state.rest, rngs, batch)
  jax.block_until_ready(sums)
  print(f"eval step (forward): {1e3 * (time.perf_counter() - t) / _STEPS.value:.2f} ms")
  if _TRACE.value:
    with jax.profiler.trace(_TRACE.value, create_perfetto_trace=True):
      run(5)
    summarise_trace(_TRACE.value, 5, _TOP.value, hlo_text=optimized_hlo(_HLO.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
