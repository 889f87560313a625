"""Gradient accumulation (config.train.accum_steps): k micro-batches per update.

Given the tiny byte-level LM (configs/lm/shakespeare.py "mamba,tiny", batch 8, dropout off
so that runs can be compared value for value), when it trains 4 steps with accum_steps 2
(or resumes at 4), then every step's loss and the final validation and test losses equal the
accum_steps=1 run's within float32 noise. A run halted at step 2 resumes under another
accum_steps (a harmless config change) to the same losses. Bad values fail in one line
naming the field, before any data is loaded. The tiny ListOps S4D (BatchNorm, dropout on:
micro-batches see their own statistics and dropout keys, so no equality) trains under
accumulation as it does without. The multi-device case (micro-batches split over a
data x seq mesh of 8 fake devices) is in tests/test_train_seq.py.
"""

import numpy as np
import pytest

from configs.lm import shakespeare
from tests._testing import write_word_corpus
from tests.test_train import data_cache, jax_cache, tiny_config, train_losses  # noqa: F401
from train import metrics as metrics_lib
from train import trainer

RTOL = 1e-5  # float32 noise over a 4-step run (the micro-batches' sums run in another order)

# test_train's persistent compilation cache: the runs of one accum_steps share programs
pytestmark = pytest.mark.usefixtures("jax_cache")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return str(write_word_corpus(tmp_path_factory.mktemp("corpus")))


def lm_config(corpus, accum: int, **train):
  config = shakespeare.get_config("mamba,tiny")
  config.data.path = corpus
  config.model.dropout = 0.0
  config.train.update(dict(batch_size=8, eval_batch_size=8, accum_steps=accum, **train))
  return config


def losses(workdir) -> dict:
  out = {"train": []}
  for m in metrics_lib.read_metrics(str(workdir)):
    if m["split"] == "train":
      out["train"].append(m["loss"])
    else:
      out[m["split"]] = m["loss"]
  return out


@pytest.fixture(scope="module")
def one_batch(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("accum1")
  trainer.run(lm_config(corpus, 1), str(workdir))
  return losses(workdir)


def assert_same(got, want):
  assert len(got["train"]) == len(want["train"]) == 4
  np.testing.assert_allclose(got["train"], want["train"], rtol=RTOL)
  np.testing.assert_allclose([got["val"], got["test"]], [want["val"], want["test"]], rtol=RTOL)


def test_accumulated_update_equals_the_one_batch_update(corpus, one_batch, tmp_path):
  results = trainer.run(lm_config(corpus, 2), str(tmp_path))
  assert_same(losses(tmp_path), one_batch)
  assert results["steps"] == 4


def test_resume_under_another_accum_steps(corpus, one_batch, tmp_path):
  # halted at accum_steps 1, resumed at 4 (micro-batches of 2): the same losses
  out = trainer.run(lm_config(corpus, 1, halt_at_step=2), str(tmp_path))
  assert out["halted_at_step"] == 2
  trainer.run(lm_config(corpus, 4), str(tmp_path))  # harmless: no ConfigMismatchError
  assert_same(losses(tmp_path), one_batch)
  assert "train.accum_steps" in (tmp_path / "config_changes.jsonl").read_text()


@pytest.mark.parametrize("accum, match", [
    (3, r"config.train.accum_steps=3: must divide train.batch_size=8"),
    (0, r"config.train.accum_steps=0: must be an int >= 1"),
    (True, r"config.train.accum_steps=True: must be an int >= 1"),
])
def test_bad_accum_steps_fail_in_one_line(corpus, tmp_path, accum, match):
  with pytest.raises(ValueError, match=match) as err:
    trainer.run(lm_config(corpus, accum), str(tmp_path))
  assert "\n" not in str(err.value)
  assert not list(tmp_path.iterdir())  # nothing written


def test_a_config_without_the_key_trains_unaccumulated(corpus):
  config = lm_config(corpus, 1)
  with config.unlocked():
    del config.train["accum_steps"]  # a config.py saved before the key existed
  trainer.validate_config(config)
  assert trainer.accum_steps(config) == 1


def test_batchnorm_model_trains_under_accumulation(jax_cache, data_cache, tmp_path):  # noqa: F811
  results = trainer.run(tiny_config(data_cache, **{"train.accum_steps": 2}), str(tmp_path))
  got = train_losses(tmp_path)
  assert sorted(got) == list(range(1, 17))
  assert np.isfinite([results["test_loss"], results["val_loss"]]).all()
  first, last = np.mean([got[s] for s in (1, 2, 3)]), np.mean([got[s] for s in (14, 15, 16)])
  assert last < first - 0.3, got  # test_train.test_loss_decreases's bar for accum_steps=1
