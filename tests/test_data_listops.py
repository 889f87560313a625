"""ListOps: generator, the LRA TSV layout, tokenizer, cache, and load_task."""

import os
import random
import statistics
from pathlib import Path

import numpy as np
import pytest

import data
from data import listops

SMALL = dict(num_train=60, num_val=10, num_test=10, seed=3, min_length=10, max_length=120,
             max_depth=6, max_args=5)


# An independent reading of a Source string: a parse tree, its value, its LRA spelling.

def parse(source):
  """Source string -> nested (op, [args]) / int, checking the bracket structure."""
  stack, result = [], None
  for tok in source.split():
    if tok in ("(", ")"):
      continue
    if tok.startswith("["):
      stack.append((tok[1:], []))
    elif tok == "]":
      node = stack.pop()
      if stack:
        stack[-1][1].append(node)
      else:
        result = node
    else:
      d = int(tok)
      if stack:
        stack[-1][1].append(d)
      else:
        result = d
  assert not stack
  return result


def value(tree):
  if isinstance(tree, int):
    return tree
  op, args = tree
  vals = [value(a) for a in args]
  return {"MIN": min, "MAX": max, "MED": lambda v: int(statistics.median(v)),
          "SM": lambda v: sum(v) % 10}[op](vals)


def lra_spelling(tree):
  """LRA's writer: (((op, a0), a1), ..., ']') printed as '( x y )' recursively."""
  def to_string(t):
    if isinstance(t, str):
      return t
    if isinstance(t, int):
      return str(t)
    return "( " + to_string(t[0]) + " " + to_string(t[1]) + " )"

  def to_tuple(tree):
    if isinstance(tree, int):
      return tree
    op, args = tree
    t = ("[" + op, to_tuple(args[0]))
    for a in args[1:]:
      t = (t, to_tuple(a))
    return (t, "]")
  return to_string(to_tuple(tree))


def shape(tree, depth=1):
  """(tree depth, largest argument count)."""
  if isinstance(tree, int):
    return depth, 0
  sub = [shape(a, depth + 1) for a in tree[1]]
  return max(s[0] for s in sub), max(len(tree[1]), *(s[1] for s in sub))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
  return listops.write_dataset(tmp_path_factory.mktemp("listops"), **SMALL)


def test_files_have_the_release_layout(small_set):
  for split, name in listops.SPLIT_FILES.items():
    lines = (small_set / name).read_text().splitlines()
    assert lines[0] == "Source\tTarget"
    count = SMALL["num_train"] if split == "train" else SMALL["num_val"]
    assert len(lines) == 1 + count
    for line in lines[1:]:
      source, target = line.split("\t")
      assert source.startswith("( ") and source.endswith(" )")


def test_trees_are_valid_distinct_and_correctly_labelled(small_set):
  seen = set()
  for name in listops.SPLIT_FILES.values():
    sources, targets = listops.read_tsv(small_set / name)
    for source, target in zip(sources, targets):
      tree = parse(source)
      assert source == lra_spelling(tree)
      assert value(tree) == target
      length = sum(tok not in ("(", ")") for tok in source.split())
      assert SMALL["min_length"] < length < SMALL["max_length"]
      depth, args = shape(tree)
      assert depth <= SMALL["max_depth"] and args <= SMALL["max_args"]
      seen.add(source)
  assert len(seen) == SMALL["num_train"] + SMALL["num_val"] + SMALL["num_test"]


def test_encoding_matches_the_tokens_and_mask_the_padding(small_set):
  seq_len = 100  # shorter than some trees: exercises truncation too
  ds = listops.read_split(small_set / "basic_train.tsv", seq_len)
  sources, targets = listops.read_tsv(small_set / "basic_train.tsv")
  inputs, mask = ds["inputs"], ds["mask"]
  assert inputs.shape == (SMALL["num_train"], seq_len) and inputs.dtype == np.int32
  assert mask.dtype == bool and ds["targets"].dtype == np.int32
  np.testing.assert_array_equal(ds["targets"], targets)
  assert inputs.min() >= 0 and inputs.max() < listops.VOCAB_SIZE
  assert not (inputs == listops.UNK_ID).any()
  np.testing.assert_array_equal(mask, inputs != listops.PAD_ID)
  for row, m, source in zip(inputs, mask, sources):
    tokens = [t.lstrip("[").replace("]", "X") for t in source.split() if t not in ("(", ")")]
    n = min(len(tokens), seq_len)
    assert m[:n].all() and not m[n:].any()  # real tokens first, then padding
    assert listops.detokenize(row) == " ".join(tokens[:seq_len])


def test_hand_written_release_rows_are_read_correctly(tmp_path):
  path = tmp_path / "basic_test.tsv"
  path.write_bytes(b"Source\tTarget\r\n"
                   b"( ( ( ( [MAX 1 ) 7 ) 2 ) ] )\t7\r\n"
                   b"( ( ( [SM ( ( ( [MED 6 ) 5 ) ] ) ) 1 ) ] )\t6\r\n"
                   b"( ( [MIN 3 ) ( ( ( [MED 4 ) 9 ) ] ) ) ] )\t3\r\n")
  ds = listops.read_split(path, seq_len=12)
  ids = listops.TOKEN_IDS
  d = lambda k: ids[str(k)]
  expected = np.array([
      [ids["MAX"], d(1), d(7), d(2), ids["X"]] + [0] * 7,
      [ids["SM"], ids["MED"], d(6), d(5), ids["X"], d(1), ids["X"]] + [0] * 5,
      [ids["MIN"], d(3), ids["MED"], d(4), d(9), ids["X"], ids["X"]] + [0] * 5,
  ])
  np.testing.assert_array_equal(ds["inputs"], expected)
  np.testing.assert_array_equal(ds["targets"], [7, 6, 3])
  assert listops.VOCAB[:7] == ("<pad>", "<unk>", "MIN", "MAX", "MED", "SM", "X")


def test_tokenizer_maps_unknown_tokens_to_unk_and_accepts_bare_operators():
  ids = listops.TOKEN_IDS
  np.testing.assert_array_equal(listops.tokenize("( ( [MAX 12 ) foo ) ] )"),
                                [ids["MAX"], listops.UNK_ID, listops.UNK_ID, ids["X"]])
  np.testing.assert_array_equal(listops.tokenize("MED 3 SM 4 X X"),
                                [ids["MED"], ids["3"], ids["SM"], ids["4"], ids["X"], ids["X"]])


def test_bad_tsv_fails_clearly(tmp_path):
  path = tmp_path / "x.tsv"
  path.write_text("Input\tLabel\n1\t1\n")
  with pytest.raises(ValueError, match="Source and Target"):
    listops.read_tsv(path)
  path.write_text("Source\tTarget\n( ( [MAX 1 ) 2 ) ] )\t12\n")
  with pytest.raises(ValueError, match="not in 0..9"):
    listops.read_tsv(path)


def test_generation_is_deterministic_given_the_seed(small_set, tmp_path):
  again = listops.write_dataset(tmp_path / "again", **SMALL)
  other = listops.write_dataset(tmp_path / "other", **{**SMALL, "seed": SMALL["seed"] + 1})
  for name in listops.SPLIT_FILES.values():
    assert (again / name).read_bytes() == (small_set / name).read_bytes()
    assert (other / name).read_bytes() != (small_set / name).read_bytes()


def test_lra_default_generator_draws_long_deep_trees():
  rng = random.Random(0)
  kept = []
  while len(kept) < 3:
    tree = listops.generate_tree(rng, max_length=2000)
    if tree is not None and tree[1] > 500:
      kept.append(tree)
  for source, length, val in kept:
    tree = parse(source)
    assert value(tree) == val
    assert sum(tok not in ("(", ")") for tok in source.split()) == length < 2000
    depth, args = shape(tree)
    assert depth <= 10 and args <= 10


def test_generator_follows_the_lra_node_distribution():
  # max_depth 2: the root is an operator with probability 0.25, with 2..max_args digit arguments.
  rng = random.Random(1)
  trees = [parse(listops.generate_tree(rng, max_depth=2, max_args=10)[0]) for _ in range(4000)]
  ops = [t for t in trees if not isinstance(t, int)]
  assert abs(len(ops) / len(trees) - 0.25) < 0.03
  assert all(isinstance(a, int) for _, args in ops for a in args)
  counts = np.bincount([len(args) for _, args in ops], minlength=11)
  assert counts[:2].sum() == 0 and (counts[2:] > 0.6 * len(ops) / 9).all()
  kinds = np.unique([op for op, _ in ops], return_counts=True)
  assert list(kinds[0]) == sorted(listops.OPERATORS) and kinds[1].min() > 0.7 * len(ops) / 4


def test_load_task_generates_once_into_the_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("SSMLAB_CACHE", str(tmp_path / "env_cache"))
  cfg = dict(task="listops", seq_len=128, **SMALL)
  spec, splits = data.load_task(cfg)
  assert spec == data.TaskSpec(name="listops", kind="classification", input_kind="tokens",
                               seq_len=128, num_classes=10, vocab_size=listops.VOCAB_SIZE)
  assert {k: len(v) for k, v in splits.items()} == {"train": 60, "validation": 10, "test": 10}
  # A TFDS dataset named by the generator's options (data/builders.py), no temp folder left.
  name = listops.cache_name(**SMALL).replace("listops-", "gen-n")
  prepared = tmp_path / "env_cache" / "tfds" / "ssmlab_listops"
  assert [p.name for p in (tmp_path / "env_cache").iterdir()] == ["tfds"]
  assert [p.name for p in prepared.iterdir()] == [name]
  assert (prepared / name / "1.0.0" / "ssmlab_listops-train.array_record-00000-of-00001").is_file()

  def fail(*args, **kwargs):
    raise AssertionError("a cached set must not be generated again")

  monkeypatch.setattr(listops, "write_dataset", fail)
  _, again = data.load_task(cfg)
  np.testing.assert_array_equal(again["train"]["inputs"], splits["train"]["inputs"])
  # data.cache_dir wins over the environment variable.
  monkeypatch.undo()
  data.load_task(dict(cfg, cache_dir=str(tmp_path / "cfg_cache")))
  assert (tmp_path / "cfg_cache" / "tfds" / "ssmlab_listops" / name).is_dir()


def test_interrupted_generation_leaves_no_set_behind(tmp_path, monkeypatch):
  real = listops.write_dataset

  def interrupted(out_dir, **kwargs):
    real(out_dir, **kwargs)
    raise KeyboardInterrupt

  monkeypatch.setattr(listops, "write_dataset", interrupted)
  with pytest.raises(KeyboardInterrupt):
    listops.ensure_generated(tmp_path, **SMALL)
  assert list(tmp_path.iterdir()) == []


def test_load_task_reads_a_data_dir(small_set):
  spec, splits = data.load_task(dict(task="listops", data_dir=str(small_set), seq_len=64))
  assert spec.seq_len == 64 and splits["train"]["inputs"].shape == (60, 64)


def test_missing_data_dir_names_the_expected_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="basic_train.tsv.*basic_val.tsv.*basic_test.tsv"):
    data.load_task(dict(task="listops", data_dir=str(tmp_path / "nowhere")))
  (tmp_path / "basic_train.tsv").write_text("Source\tTarget\n")
  with pytest.raises(FileNotFoundError, match=r"lacks \['basic_val.tsv', 'basic_test.tsv'\]"):
    data.load_task(dict(task="listops", data_dir=str(tmp_path)))


@pytest.mark.parametrize("cfg,match", [
    (dict(task="listops", seq_lenn=10), "unknown config keys.*seq_lenn"),
    (dict(task="listops", seq_len=0), "seq_len"),
    (dict(task="listops", min_length=100, max_length=101), "max_length"),
    (dict(task="listops", max_depth=1), "max_depth"),
    (dict(task="lisstops"), "valid tasks.*listops.*mqar"),
])
def test_bad_config_fails_clearly(cfg, match):
  with pytest.raises(ValueError, match=match):
    data.load_task(cfg)


def test_too_few_distinct_trees_fails_instead_of_looping(tmp_path):
  with pytest.raises(RuntimeError, match="too few distinct trees"):
    listops.write_dataset(tmp_path, num_train=10**6, num_val=0, num_test=0, min_length=3,
                          max_length=5, max_depth=2, max_args=2, max_rejections=20_000)
