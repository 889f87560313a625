"""Config files: every model and size builds, is locked, overrides work and typos fail."""

import importlib

import pytest
from absl import flags
from ml_collections import config_flags

import models
from configs import common, mqar
from configs.lra import listops
from train import trainer


def parse(*args):
  """What `python -m train` does with its command line, on a private FlagValues."""
  argv = ["prog", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def _mixer_kind(name):
  return "attention" if name == "transformer" else name


def _importable(kind):
  try:
    return bool(models.mixer_options(kind) is not None)
  except (ImportError, ValueError):
    return False


LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
_LRA = [importlib.import_module(f"configs.lra.{task}") for task in LRA_TASKS]
ALL = ([(mod.get_config, f"{m},{s}" if s else m) for mod in _LRA for m in mod.MODELS
        for s in getattr(mod, "SIZES", common.SIZES)]
       + [(mqar.get_config, m) for m in mqar.MODELS]
       + [(mqar.get_config, f"{m},{s}") for m in mqar.MODELS for s in ("tiny", "zoology")])


def test_every_lra_task_has_every_model():
  """Issue 26: `get_config(model)` works for every registered model on all six tasks."""
  registered = {"transformer" if k == "attention" else k for k in models.MIXERS}
  for task, mod in zip(LRA_TASKS, _LRA):
    assert set(mod.MODELS) == registered, task


@pytest.mark.parametrize("get_config,arg", ALL, ids=[f"{g.__module__}:{a}" for g, a in ALL])
def test_every_config_builds_and_validates(get_config, arg):
  config = get_config(arg)
  trainer.validate_config(config)
  assert config.is_locked
  assert config.name.endswith(arg.split(",")[0] + ("," + arg.split(",")[1] if "," in arg else ""))
  kind = _mixer_kind(config.model.name)
  if not _importable(kind):
    pytest.skip(f"mixer {kind!r} does not import yet")
  unknown = set(config.model.mixer.keys()) - set(models.mixer_options(kind))
  assert not unknown, f"{arg}: mixer options {unknown} not accepted by {kind!r}"


def test_published_listops_recipes():
  """Spot checks against the sources named in configs/lra/listops.py."""
  s4 = listops.get_config("s4")
  assert (s4.model.num_layers, s4.model.d_model, s4.model.mixer.d_state) == (6, 256, 4)
  assert (s4.optim.lr, s4.optim.ssm_lr, s4.optim.weight_decay) == (0.01, 1e-3, 0.05)
  assert (s4.train.batch_size, s4.train.num_steps, s4.optim.warmup_steps) == (32, 120_000, 12_000)
  assert s4.model.norm == "batch" and not s4.model.prenorm and s4.model.bidirectional
  s4d = listops.get_config("s4d")
  assert (s4d.model.num_layers, s4d.model.d_model, s4d.model.mixer.d_state) == (8, 128, 64)
  assert (s4d.train.batch_size, s4d.train.num_steps) == (50, 80_000)
  assert s4d.data.seq_len == 2000 and s4d.data.num_train == 96_000


def test_published_pathfinder_recipes_of_the_other_models():
  """Spot checks against the sources named in configs/lra/pathfinder.py and image.py."""
  from configs.lra import image, pathfinder, pathx
  t = pathfinder.get_config("transformer")
  assert (t.model.num_layers, t.model.d_model, t.model.mixer.num_heads) == (1, 128, 4)
  assert (t.train.batch_size, t.train.num_steps, t.optim.warmup_steps) == (512, 62_400, 312)
  assert (t.optim.lr, t.optim.weight_decay, t.model.dropout) == (1e-3, 0.0, 0.2)
  tx = pathx.get_config("transformer")
  assert (tx.model.d_model, tx.model.mixer.num_heads, tx.train.batch_size) == (32, 2, 64)
  assert tx.model.mixer.max_len == 16384 and tx.optim.grad_clip == 1.0
  g = pathfinder.get_config("sgconv")
  assert (g.model.mixer.kernel_dim, g.optim.weight_decay, g.optim.warmup_steps) == (32, 0.03, 2_500)
  assert g.model.mixer.l_max == 1024 and g.model.dropout == 0.2
  gx = pathx.get_config("sgconv")
  assert (gx.model.mixer.kernel_dim, gx.train.num_steps, gx.train.batch_size) == (64, 125_000, 16)
  m = pathfinder.get_config("mamba2")
  assert (m.train.batch_size, m.train.num_steps, m.optim.warmup_steps) == (64, 500_000, 50_000)
  assert not m.model.bidirectional and m.optim.b2 == 0.95
  i = image.get_config("transformer")
  assert (i.model.num_layers, i.model.d_model, i.model.pooling) == (1, 32, "first")
  assert (i.train.batch_size, i.train.num_steps, i.optim.lr) == (256, 35_000, 5e-4)
  assert image.get_config("s4d").train.num_steps == 180_000     # the others keep the S4 budget


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sgconv", "mamba2", "transformer"])
def test_tiny_pathfinder_trains_the_other_model_families(model, tmp_path):
  """The Pathfinder configs past s4 / s4d train a few steps (an LTI kernel, a selective
  recurrence, attention); s4d's tiny run is tests/test_data_pathfinder.py's."""
  import numpy as np
  from configs.lra import pathfinder
  config = pathfinder.get_config(f"{model},tiny")
  config.data.cache_dir = str(tmp_path / "cache")
  results = trainer.run(config, str(tmp_path / "work"))
  assert results["steps"] == config.train.num_steps
  assert all(np.isfinite(v) for v in results.values() if isinstance(v, float))


def test_short_pathfinder_is_the_recipe_over_a_tenth_of_its_schedule():
  from configs.lra import pathfinder, pathx
  for module in (pathfinder, pathx):
    full, short = module.get_config("s4d"), module.get_config("s4d,short")
    trainer.validate_config(short)
    assert short.name.endswith("s4d,short")
    assert (short.train.num_steps, short.optim.warmup_steps) == (
        full.train.num_steps // 10, full.optim.warmup_steps // 10)
    # everything else is the published recipe
    for section in ("model", "data"):
      assert short[section].to_dict() == full[section].to_dict()
    assert {k: v for k, v in short.optim.items() if k != "warmup_steps"} == {
        k: v for k, v in full.optim.items() if k != "warmup_steps"}
    assert short.train.batch_size == full.train.batch_size
  with pytest.raises(ValueError, match="unknown size 'short'"):
    listops.get_config("s4d,short")


def test_seq_len_override_follows_into_l_max():
  config = parse("--config=configs/lra/listops.py:s4,tiny", "--config.data.seq_len=48",
                 "--config.train.num_steps=30", "--config.optim.lr=3e-3")
  assert config.data.seq_len == 48 and config.model.mixer.l_max == 48
  assert config.train.num_steps == 30 and config.optim.lr == 3e-3


def test_none_fields_are_overridable():
  config = parse("--config=configs/lra/listops.py:s4d", "--config.data.data_dir=/some/where")
  assert config.data.data_dir == "/some/where"


@pytest.mark.parametrize("override", ["--config.train.num_step=30", "--config.model.mixer.foo=3",
                                      "--config.optimizer.lr=1.0"])
def test_unknown_command_line_keys_fail(override):
  with pytest.raises((AttributeError, KeyError, flags.Error)):
    parse("--config=configs/lra/listops.py:s4d,tiny", override)


def test_wrong_type_on_command_line_fails():
  with pytest.raises(flags.IllegalFlagValueError):
    parse("--config=configs/lra/listops.py:s4d,tiny", "--config.train.num_steps=1.5")


@pytest.mark.parametrize("arg,match", [("nosuchmodel", "unknown model"), ("s4d,huge", "unknown size"),
                                       ("", "model"), ("s4d,tiny,x", "model")])
def test_bad_config_argument(arg, match):
  with pytest.raises(ValueError, match=match):
    listops.get_config(arg)


def test_locked_config_refuses_new_keys():
  config = listops.get_config("s4d,tiny")
  with pytest.raises(AttributeError):
    config.train.num_step = 3


@pytest.mark.parametrize("section,key,value,match", [
    ("optim", "lr", -1.0, "optim.lr"),
    ("optim", "lr", float("nan"), "optim.lr"),
    ("optim", "schedule", "step", "optim.schedule"),
    ("optim", "optimizer", "adagrad", "optim.optimizer"),
    ("optim", "b2", 1.0, "optim.b2"),
    ("optim", "ssm_weight_decay", -0.1, "optim.ssm_weight_decay"),
    ("optim", "warmup_steps", 10**9, "optim.warmup_steps"),
    ("train", "num_steps", 0, "train.num_steps"),
    ("train", "batch_size", -4, "train.batch_size"),
    ("train", "eval_every", 0, "train.eval_every"),
    ("train", "checkpoint_every", -1, "train.checkpoint_every"),
])
def test_bad_values_name_the_field(section, key, value, match):
  config = listops.get_config("s4d,tiny")
  config[section][key] = value
  with pytest.raises(ValueError, match=match):
    trainer.validate_config(config)


def test_sgconv_recipes_decay_their_kernels_as_the_reference_does():
  """SGConv's reference keeps the optimizer's weight decay on its kernels (their own lr
  only); the S4 family's SSM parameters get none (configs/common.py sgconv_kernel_decay)."""
  for task, mod in zip(LRA_TASKS, _LRA):
    for size in ("", "tiny"):
      arg = lambda m: f"{m},{size}" if size else m  # noqa: E731
      g = mod.get_config(arg("sgconv"))
      assert g.optim.ssm_weight_decay == g.optim.weight_decay > 0, (task, size)
      for other in ("s4", "s4d", "lssl"):
        assert mod.get_config(arg(other)).optim.ssm_weight_decay == 0.0, (task, other)


def test_a_config_from_before_ssm_weight_decay_still_validates():
  config = listops.get_config("s4d,tiny")
  config.unlock()
  del config.optim["ssm_weight_decay"]
  trainer.validate_config(config)


def test_unknown_key_in_an_unlocked_config_fails():
  config = listops.get_config("s4d,tiny")
  config.unlock()
  config.train.num_step = 3
  with pytest.raises(ValueError, match="num_step"):
    trainer.validate_config(config)


def test_mqar_config_is_causal_and_lm():
  config = mqar.get_config("mamba")
  assert config.data.task == "mqar" and not config.model.bidirectional
  assert config.model.pooling == "none"
  with pytest.raises(ValueError, match="unknown model"):
    mqar.get_config("nosuchmodel")


def test_config_modules_are_importable_by_path():
  for name in ("configs.common", "configs.mqar", "configs.lra.listops"):
    assert importlib.import_module(name)


def test_lm_recipes_have_about_the_same_size():
  """configs/lm/shakespeare.py: every model builds (abstractly) at its default and tiny
  sizes, and the default sizes hold 3.5M-3.7M parameters (the docstring's table)."""
  import jax
  from flax import nnx
  from configs.lm import shakespeare
  from data.task import TaskSpec
  task = TaskSpec("lm", "lm", "tokens", 256, 258, vocab_size=258)
  for name in shakespeare.MODELS:
    for size in ("", "tiny"):
      config = shakespeare.get_config(f"{name},{size}" if size else name)
      model = nnx.eval_shape(lambda: models.build_model(config.model, task, rngs=nnx.Rngs(0)))
      count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
      if not size:
        assert 3.5e6 < count < 3.7e6, (name, count)
