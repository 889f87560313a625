r"""Evaluate a run's checkpoint on the devices at hand, whatever the run was trained on.

  python -m train.evaluate --workdir=runs/listops_s4d                 # latest, test split
  python -m train.evaluate --workdir=runs/listops_s4d --split=validation --step=best
  python -m train.evaluate --workdir=runs/listops_s4d --step=24000 --fsdp=2

Reads the run's config (workdir/config.json, else config.py), builds the model and the
train state's shardings for the current devices (train/sharding.py), and restores the
checkpoint with those target shardings: orbax reads each saved array and lays it out
for the new mesh, so a state saved on 8 devices with (data=4, fsdp=2) restores on 1
device and the other way round. The evaluation is exact over every example of the split
(Trainer.evaluate), so it reproduces the run's own numbers up to float summation order.

Mesh: the run's config.train.mesh when it fits the current device count, else all
devices on "data" (or data x --fsdp). The eval batch size is the run's, rounded up to a
multiple of the device count when needed (padding rows have weight 0).

Writes workdir/eval_<split>_<n>dev.json and returns the same dict: split, step, loss,
accuracy, examples, the device kind/count/mesh, the checkpoint path, and bits_per_byte
for language-modelling corpora.

Errors: the workdir or its config missing -> FileNotFoundError; no checkpoint (or no
checkpoint at --step) -> CheckpointNotFoundError; a checkpoint that fails to restore or
whose arrays fail their checksums -> checkpoint.CorruptCheckpointError naming the
folder and the other steps available; one whose arrays do not fit the model of the
run's config -> checkpoint.StateMismatchError. Unlike the trainer, nothing is moved aside and no
older checkpoint is substituted silently.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys

from absl import app, flags

from train import cli

log = logging.getLogger(__name__)

SPLITS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


class CheckpointNotFoundError(FileNotFoundError):
  """The workdir has no (matching) checkpoint."""


def load_config(workdir: str):
  """The ConfigDict the run was trained with (workdir/config.json, else config.py)."""
  import ml_collections

  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      try:
        return ml_collections.ConfigDict(json.load(f))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
  path = os.path.join(workdir, "config.py")
  if os.path.exists(path):
    namespace: dict = {}
    with open(path) as f:
      exec(compile(f.read(), path, "exec"), namespace)  # noqa: S102 -- written by the trainer
    return namespace["get_config"]()
  raise FileNotFoundError(f"{workdir} has no config.json or config.py: not a run directory "
                          f"written by train.trainer.run")


def _steps_in(folder: str) -> list[int]:
  """Completed orbax step folders (in-progress ones carry a suffix and are left out)."""
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def find_checkpoint(workdir: str, step: int | str | None = None) -> tuple[str, int]:
  """("checkpoints" | "best", step) of the checkpoint to evaluate.

  step None: the latest periodic/final checkpoint (the best one if there is none);
  "best": the best-validation checkpoint; an int: that step in either folder.
  """
  latest = _steps_in(os.path.join(workdir, "checkpoints"))
  best = _steps_in(os.path.join(workdir, "best"))
  available = (f"available: checkpoints/ {latest or 'none'}, best/ {best or 'none'}")
  if not latest and not best:
    raise CheckpointNotFoundError(f"no checkpoint in {workdir} (looked in checkpoints/ and "
                                  f"best/)")
  if step is None:
    return ("checkpoints", latest[-1]) if latest else ("best", best[-1])
  if step == "best":
    if not best:
      raise CheckpointNotFoundError(f"no best checkpoint in {workdir}; {available}")
    return "best", best[-1]
  if step in latest:
    return "checkpoints", step
  if step in best:
    return "best", step
  raise CheckpointNotFoundError(f"no checkpoint at step {step} in {workdir}; {available}")


def _choose_mesh(config, fsdp: int | None):
  """The run's mesh if it fits the devices here (and --fsdp is not given), else data x fsdp."""
  import jax

  from train import sharding as sharding_lib

  n = jax.device_count()
  if fsdp is None:
    try:
      sharding_lib.mesh_shape(config.train.mesh, n)
      return dict(config.train.mesh)
    except ValueError:
      log.info("the run's mesh %s does not fit %d device(s); evaluating with all of them on "
               "'data'", dict(config.train.mesh), n)
      fsdp = 1
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"--fsdp={fsdp} must be >= 1 and divide the {n} devices")
  return dict(data=-1, fsdp=fsdp)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def evaluate(workdir: str, split: str = "test", step: int | str | None = None, *,
             fsdp: int | None = None, write: bool = True) -> dict:
  """Restores a checkpoint of `workdir` on the current devices and evaluates `split`.

  Args:
    workdir: a run directory of train.trainer.run.
    split: "test", "validation" (or "val"), "train".
    step: None (latest), "best", or a step number.
    fsdp: size of the "fsdp" mesh axis; None keeps the run's mesh where it fits.
    write: write workdir/eval_<split>_<n>dev.json (process 0).

  Returns:
    dict with split, step, loss, accuracy, examples, device info and the checkpoint path.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid: {sorted(SPLITS)}")
  split = SPLITS[split]
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  config = load_config(workdir)
  folder, step = find_checkpoint(workdir, step)  # before the heavy imports: fail fast

  import jax

  import data
  from train import checkpoint as checkpoint_lib
  from train import sharding as sharding_lib
  from train import trainer as trainer_lib

  config.train.mesh = _choose_mesh(config, fsdp)
  mesh = sharding_lib.make_mesh(config.train.mesh)
  n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  eval_bs = _round_up(config.train.eval_batch_size, math.lcm(n_shards, jax.process_count()))
  per_host = sharding_lib.per_host_batch(eval_bs, mesh, "eval batch size")
  task, splits = data.load_task(config.data)
  trainer = trainer_lib.Trainer(config, task, mesh)

  ckpt = checkpoint_lib.Checkpointer(workdir, keep=max(1, config.train.keep_checkpoints))
  path = os.path.join(workdir, folder, str(step))
  try:
    # The trainer's own restore (same item layout and checksums), with the
    # target shardings of this mesh; no quarantine and no fallback here.
    state, _, _ = ckpt.restore(step, trainer.abstract_state, best=folder != "checkpoints")
  except checkpoint_lib.StateMismatchError:
    raise  # the run's config.json does not build the checkpoint's state: says so itself
  except Exception as e:  # noqa: BLE001 -- any failure: the checkpoint is unusable
    others = [s for s in _steps_in(os.path.join(workdir, "checkpoints")) if s != step]
    raise checkpoint_lib.CorruptCheckpointError(
        f"checkpoint {path} could not be restored ({type(e).__name__}: {str(e)[:300]}); "
        f"other checkpoints: {others or 'none'} (--step=N, or --step=best)") from e
  finally:
    ckpt.close()
  if int(jax.device_get(state.step)) != step:
    raise checkpoint_lib.CorruptCheckpointError(
        f"checkpoint {path} holds a train state at step {int(jax.device_get(state.step))}")

  rngs = trainer.init_rngs()
  metrics = trainer.evaluate(state, rngs, splits[split], per_host)
  out = dict(
      workdir=workdir, config_name=config.get("name", ""), split=split, step=step,
      checkpoint=path, loss=metrics["loss"], accuracy=metrics["accuracy"],
      examples=metrics["weight"], device_kind=jax.devices()[0].device_kind,
      device_count=jax.device_count(), process_count=jax.process_count(),
      mesh=dict(mesh.shape), eval_batch_size=eval_bs,
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      jax_version=jax.__version__)
  if "bits_per_byte" in metrics:
    out["bits_per_byte"] = metrics["bits_per_byte"]
  if write and jax.process_index() == 0:
    name = os.path.join(workdir, f"eval_{split}_{jax.device_count()}dev.json")
    with open(name + ".tmp", "w") as f:
      json.dump(out, f, indent=2)
    os.replace(name + ".tmp", name)
    log.info("wrote %s", name)
  return out


# -- command line (absl flags, as the trainer's) -------------------------------------------

PROG = "python -m train.evaluate"
# Our own FlagValues: the trainer's CLI defines --workdir too, and main(argv) may be called
# more than once in one process (tests); absl's global flags take whatever is left.
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The run directory.", flag_values=FLAGS)
flags.DEFINE_enum("split", "test", sorted(SPLITS), "The split to evaluate.", flag_values=FLAGS)
flags.DEFINE_string("step", None, "Checkpoint step, or 'best' (default: the latest).",
                    flag_values=FLAGS)
flags.DEFINE_integer("fsdp", None, "fsdp mesh axis size (default: the run's mesh where it "
                     "fits).", lower_bound=1, flag_values=FLAGS)


def _step_value(text: str | None) -> int | str | None:
  if text is None or text == "best":
    return text
  try:
    value = int(text)
  except ValueError:
    raise app.UsageError(f"--step must be an integer or 'best', got {text!r}") from None
  if value < 0:
    raise app.UsageError(f"--step must be >= 0, got {value}")
  return value


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags_parser: this module's flags, then absl's global ones from the rest."""
  try:
    rest = FLAGS(argv, known_only=True)
    return flags.FLAGS(rest)
  except flags.Error as e:
    raise app.UsageError(str(e)) from None


def _run(argv: list[str]) -> dict:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (the run directory)")
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file at INFO
  from train import checkpoint, sharding
  checkpoint.shorten_orbax_errors()  # a damaged checkpoint: one line per orbax error
  checkpoint.quiet_abandoned_reads()
  sharding.maybe_initialize_distributed()
  out = evaluate(FLAGS.workdir, SPLITS[FLAGS.split], _step_value(FLAGS.step), fsdp=FLAGS.fsdp)
  print(f"{out['split']} step {out['step']}  loss {out['loss']:.6g}  "
        f"accuracy {out['accuracy']:.6g}  ({int(out['examples'])} examples, "
        f"{out['device_count']} {out['device_kind']} device(s), mesh {out['mesh']})")
  print("RESULT " + json.dumps(out))
  return out


def main(argv: list[str] | None = None) -> dict:
  """Parses `argv` (flags only, no program name; None: sys.argv[1:]) and evaluates."""
  FLAGS.unparse_flags()
  rest = parse_flags([PROG, *(sys.argv[1:] if argv is None else argv)])
  return _run(rest)


def _cli(argv: list[str]) -> None:
  try:
    _run(argv)
  except (FileNotFoundError, ValueError, RuntimeError) as err:  # clear one-line errors
    print(f"train.evaluate: error: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(1)


_cli_parse = cli.flags_parser("train.evaluate", PROG, __doc__, FLAGS, parse_flags)


if __name__ == "__main__":
  app.run(_cli, flags_parser=_cli_parse)
