"""LM corpora: documents, vocabularies, packing, splits by document, bits per byte, config."""

import io
import math
import re
import sys
import tarfile
import types

import numpy as np
import pytest

import data
import data.text
from data import integrity, lm

PARAGRAPHS = [f"Para {i}: {'abc' * (i % 5 + 1)} done.\nSecond line {i}." for i in range(40)]


@pytest.fixture
def corpus_file(tmp_path):
  path = tmp_path / "corpus.txt"
  # Blank lines with stray spaces and CRs still separate paragraphs.
  path.write_text("\n\n".join(PARAGRAPHS[:20]) + "\n \r\n" + "\n\n".join(PARAGRAPHS[20:]) + "\n\n\n")
  return path


@pytest.fixture
def corpus_dir(tmp_path):
  root = tmp_path / "docs"
  (root / "sub").mkdir(parents=True)
  for i, p in enumerate(PARAGRAPHS[:12]):
    (root / ("sub" if i % 2 else "") / f"d{i:02d}.txt").write_text(p + "\n\nsame doc\n")
  (root / "ignored.md").write_text("not a document")
  return root


def write_archive(path, files, *, extra_members=True):
  """A tar archive (compression from the suffix) of name -> bytes, in the given order,
  plus a directory and a symlink member (not regular files: never documents)."""
  mode = {".gz": "w:gz", ".tgz": "w:gz", ".tar": "w"}[path.suffix]
  with tarfile.open(path, mode) as tar:
    for name, payload in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
    if extra_members:
      folder = tarfile.TarInfo("docs/folder.txt")
      folder.type = tarfile.DIRTYPE
      tar.addfile(folder)
      link = tarfile.TarInfo("docs/link.txt")
      link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
      tar.addfile(link)
  return path


# Members out of name order, nested, one not valid UTF-8, two that do not match "*.txt".
ARCHIVE_FILES = {
    "docs/sub/b.txt": b"second, nested\n\nstill one document",
    "docs/a.txt": PARAGRAPHS[0].encode(),
    "docs/README": b"not a document",
    "docs/z/c.txt": b"bytes \xff\xfe survive",
    "docs/notes.md": b"not a document either",
    "docs/0.txt": "caf\u00e9 \U0001F600".encode(),
}
ARCHIVE_DOCS = [ARCHIVE_FILES[n].decode("utf-8", "surrogateescape")
                for n in ("docs/0.txt", "docs/a.txt", "docs/sub/b.txt", "docs/z/c.txt")]


def unpack(arrays):
  """Naive inverse of pack: the token stream (leading separator included), from targets."""
  stream = [int(arrays["inputs"][0, 0])]
  for row_t, row_m in zip(arrays["targets"], arrays["mask"]):
    stream += [int(t) for t, m in zip(row_t, row_m) if m]
  return stream


def documents_of(stream):
  assert stream[0] == lm.SEP_ID and stream[-1] == lm.SEP_ID
  docs, cur = [], []
  for t in stream[1:]:
    if t == lm.SEP_ID:
      docs.append(cur)
      cur = []
    else:
      cur.append(t)
  return docs


def test_paragraph_and_block_documents(corpus_file):
  docs = lm.read_documents(corpus_file)
  assert docs == PARAGRAPHS
  text = corpus_file.read_bytes().decode()  # CRs kept: no newline translation
  blocks = lm.read_documents(corpus_file, document_split="block", block_size=50)
  assert "".join(blocks) == text and all(len(b) == 50 for b in blocks[:-1])
  with pytest.raises(ValueError, match="document_split"):
    lm.split_documents(text, "sentence")


def test_directory_documents(corpus_dir):
  docs = lm.read_documents(corpus_dir)
  # Sorted by relative path: top-level files first, then sub/; each file is one document.
  names = sorted([f"d{i:02d}.txt" for i in range(0, 12, 2)] + [f"sub/d{i:02d}.txt" for i in range(1, 12, 2)])
  expected = [PARAGRAPHS[int(n.split("d")[-1][:2])] + "\n\nsame doc\n" for n in names]
  assert docs == expected
  with pytest.raises(FileNotFoundError, match="no files matching"):
    lm.read_documents(corpus_dir, pattern="*.csv")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    lm.read_documents(corpus_dir / "missing.txt")


@pytest.mark.parametrize("name", ["docs.tar", "docs.tar.gz", "docs.tgz"])
def test_archive_documents(tmp_path, name):
  """Given an archive with members out of order, when read, then each regular member whose
  basename matches is one document, in member-name order, with its exact bytes."""
  path = write_archive(tmp_path / name, ARCHIVE_FILES)
  assert lm.read_documents(path) == ARCHIVE_DOCS
  assert lm.read_documents(path)[3].encode("utf-8", "surrogateescape") == b"bytes \xff\xfe survive"
  assert lm.read_documents(path, pattern="README") == ["not a document"]
  assert lm.read_documents(path, pattern="*.txt", members=r"/sub/") == [ARCHIVE_DOCS[2]]
  assert [n for n, b in lm.archive_members(path, names_only=True)] == [
      "docs/0.txt", "docs/a.txt", "docs/sub/b.txt", "docs/z/c.txt"]


def test_archive_reads_like_the_directory(corpus_dir, tmp_path):
  tarball = tmp_path / "docs.tar.gz"
  with tarfile.open(tarball, "w:gz") as tar:
    tar.add(corpus_dir, arcname="docs")
  assert lm.read_documents(tarball) == lm.read_documents(corpus_dir)


def test_bad_archives_fail_clearly(tmp_path):
  good = write_archive(tmp_path / "docs.tar.gz", ARCHIVE_FILES)
  with pytest.raises(FileNotFoundError, match=r"docs.tar.gz holds no files matching '\*.csv'"):
    lm.read_documents(good, pattern="*.csv")
  cut = tmp_path / "cut.tar.gz"
  cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  junk = tmp_path / "junk.tgz"
  junk.write_bytes(b"not a tar archive at all" * 40)
  for bad in (cut, junk):
    with pytest.raises(integrity.DataError) as e:
      lm.read_documents(bad, pattern="*.txt")
    message = str(e.value)
    assert "\n" not in message and str(bad) in message and "'*.txt'" in message
    assert "damaged or truncated" in message


def test_imdb_named_corpus_selects_the_reviews(tmp_path, monkeypatch):
  """Given "imdb", then the shared tarball (data/text.py's) and only the review members."""
  path, members = lm.resolve_path("imdb")
  assert path == data.text.DEFAULT_SOURCE
  keep = ["aclImdb/train/pos/0_9.txt", "aclImdb/test/neg/12_1.txt"]
  drop = ["aclImdb/README", "aclImdb/imdb.vocab", "aclImdb/train/unsup/5_0.txt",
          "aclImdb/train/urls_pos.txt", "other/train/pos/1_7.txt", "aclImdb/train/pos/x/1_7.txt"]
  assert [n for n in keep + drop if re.search(members, n)] == keep
  files = {n: f"review {n}".encode() for n in drop + keep}
  fake = write_archive(tmp_path / "aclImdb.tar.gz", files, extra_members=False)
  monkeypatch.setitem(lm.NAMED_CORPORA, "imdb", lm.NAMED_CORPORA["imdb"]._replace(path=fake))
  assert lm.read_documents("imdb") == [f"review {n}" for n in sorted(keep)]
  spec, splits = data.load_task(dict(task="lm", path="imdb", cache_dir=str(tmp_path), seq_len=8,
                                     val_fraction=0.01, test_fraction=0.0))
  docs = sorted(documents_of(unpack(splits["train"])) + documents_of(unpack(splits["validation"])))
  assert docs == sorted(lm.ByteTokenizer().encode(f"review {n}").tolist() for n in keep)
  (tmp_path / "gone").mkdir()
  monkeypatch.setitem(lm.NAMED_CORPORA, "imdb", lm.NAMED_CORPORA["imdb"]._replace(
      path=tmp_path / "gone" / "aclImdb.tar.gz"))
  with pytest.raises(FileNotFoundError, match="the 'imdb' corpus"):
    data.load_task(dict(task="lm", path="imdb", cache_dir=str(tmp_path)))


def test_archive_corpus_through_load_task(tmp_path):
  path = write_archive(tmp_path / "docs.tar.gz", {f"d/{i:02d}.txt": p.encode()
                                                  for i, p in enumerate(PARAGRAPHS)})
  _, splits = data.load_task(dict(task="lm", path=str(path), cache_dir=str(tmp_path), seq_len=16,
                                  val_fraction=0.1, test_fraction=0.1))
  every = [lm.ByteTokenizer().decode(d) for s in splits.values() for d in documents_of(unpack(s))]
  assert sorted(every) == sorted(PARAGRAPHS)
  assert [splits[s].info["num_documents"] for s in ("train", "validation", "test")] == [32, 4, 4]


def test_real_imdb_tarball_lists_50000_reviews():
  path, members = lm.resolve_path("imdb")
  if not path.is_file():
    pytest.skip(f"{path} not present")
  names = [n for n, _ in lm.archive_members(path, members=members, names_only=True)]
  assert len(names) == lm.IMDB_REVIEWS == 50_000
  folders = {}
  for n in names:
    folders[n.rsplit("/", 1)[0]] = folders.get(n.rsplit("/", 1)[0], 0) + 1
  assert folders == {f"aclImdb/{s}/{lab}": 12_500 for s in ("train", "test") for lab in ("neg", "pos")}


def test_byte_tokenizer_round_trip_and_ids():
  tok = lm.ByteTokenizer()
  text = "héllo\n\U0001F600"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and tok.vocab_size == 258
  np.testing.assert_array_equal(ids, np.array(list(text.encode("utf-8"))) + 2)
  assert tok.decode(ids) == text
  # Invalid UTF-8 bytes survive (surrogateescape).
  raw = b"ok\xff\xfe"
  assert tok.encode(raw.decode("utf-8", "surrogateescape")).tolist() == [b + 2 for b in raw]


def test_char_tokenizer_vocab_and_unknowns():
  tok = lm.CharTokenizer.fit(["bca", "ab\n"])
  assert tok.chars == ["\n", "a", "b", "c"] and tok.vocab_size == 7
  assert tok.encode("a\ncz").tolist() == [4, 3, 6, lm.UNK_ID]
  assert tok.decode(tok.encode("cab\n")) == "cab\n"


@pytest.mark.parametrize("seq_len", [1, 5, 16])
def test_pack_layout_separators_and_shift(seq_len):
  rng = np.random.default_rng(seq_len)
  docs = [rng.integers(2, 50, size=int(n)).astype(np.int32) for n in rng.integers(0, 12, size=7)]
  out = lm.pack(docs, seq_len)
  stream = np.concatenate([[1]] + [np.concatenate([d, [1]]) for d in docs])
  n = math.ceil((len(stream) - 1) / seq_len)
  assert out["inputs"].shape == out["targets"].shape == out["mask"].shape == (n, seq_len)
  assert out["inputs"].dtype == out["targets"].dtype == np.int32 and out["mask"].dtype == bool
  flat_in, flat_t, flat_m = (out[k].reshape(-1) for k in ("inputs", "targets", "mask"))
  for i in range(n * seq_len):  # naive: position i reads stream[i], predicts stream[i + 1]
    real = i + 1 < len(stream)
    assert flat_m[i] == real
    assert flat_t[i] == (stream[i + 1] if real else 0)
    assert flat_in[i] == (stream[i] if i < len(stream) else 0)
  assert [d.tolist() for d in docs] == documents_of(unpack(out))
  assert out["mask"].sum() == len(stream) - 1


def check_segments(out, seq_len):
  """segment_ids (n, seq_len) int32: 0 at each window's start, +1 exactly at each separator
  input after it, constant elsewhere (the padded tail continuing the last id)."""
  seg, inputs = out["segment_ids"], out["inputs"]
  assert seg.dtype == np.int32 and seg.shape == inputs.shape
  assert (seg[:, 0] == 0).all()
  np.testing.assert_array_equal(np.diff(seg, axis=1), (inputs[:, 1:] == lm.SEP_ID).astype(np.int32))


@pytest.mark.parametrize("seq_len", [1, 4, 7, 64])
def test_segment_ids_change_at_separators(seq_len):
  rng = np.random.default_rng(seq_len)
  docs = [rng.integers(2, 50, size=int(n)).astype(np.int32) for n in rng.integers(0, 12, size=9)]
  plain, out = lm.pack(docs, seq_len), lm.pack(docs, seq_len, segment_ids=True)
  assert set(out) == set(plain) | {"segment_ids"}
  for key in plain:  # the option only adds a key
    np.testing.assert_array_equal(out[key], plain[key])
  check_segments(out, seq_len)
  # Naively, from the documents: document k is its separator and its tokens; the final
  # separator (a target only) opens an empty document that the padding continues.
  owner = []
  for k, d in enumerate(docs):
    owner += [k] * (1 + len(d))
  owner += [len(docs)] * (out["inputs"].size - len(owner))
  owner = np.array(owner).reshape(-1, seq_len)
  np.testing.assert_array_equal(out["segment_ids"], owner - owner[:, :1])


def test_segment_ids_mid_document_window_and_padded_tail():
  # stream: 1 a a a a a 1 b b 1 | windows of 4: [1 a a a] [a a 1 b] [b 1 0 0]
  out = lm.pack([np.full(5, 7), np.full(2, 9)], 4, segment_ids=True)
  assert out["inputs"].tolist() == [[1, 7, 7, 7], [7, 7, 1, 9], [9, 1, 0, 0]]
  assert out["segment_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 1, 1]]
  assert out["mask"].tolist() == [[True] * 4, [True] * 4, [True, False, False, False]]
  # A window that starts at a separator starts at 0 too.
  out = lm.pack([np.full(3, 7), np.full(3, 9)], 4, segment_ids=True)
  assert out["inputs"][1].tolist() == [1, 9, 9, 9] and out["segment_ids"][1].tolist() == [0] * 4


def test_segment_ids_option_through_load_task_and_loader(corpus_file, tmp_path):
  cfg = dict(task="lm", path=str(corpus_file), cache_dir=str(tmp_path), seq_len=24,
             val_fraction=0.15, test_fraction=0.15)
  _, plain = data.load_task(cfg)
  assert not any("segment_ids" in ds for ds in plain.values())
  _, seg = data.load_task(dict(cfg, segment_ids=True))
  for name, ds in seg.items():
    assert set(ds.keys()) == {"inputs", "targets", "mask", "segment_ids"}
    for key in ("inputs", "targets", "mask"):
      np.testing.assert_array_equal(ds[key], plain[name][key])
    assert ds.info == plain[name].info
    check_segments(ds, 24)
  loader = data.pipeline.make_loader(seg["train"], batch_size=3, shuffle=True, seed=0,
                                     drop_remainder=True, prefetch=0)
  batch = next(loader)
  assert set(batch) == {"inputs", "targets", "mask", "segment_ids", "weights"}
  assert batch["segment_ids"].shape == (3, 24) and batch["segment_ids"].dtype == np.int32
  check_segments(batch, 24)
  with pytest.raises(ValueError, match="segment_ids must be True or False"):
    data.load_task(dict(cfg, segment_ids="yes"))


def test_split_by_document_is_a_partition():
  for n, shuffle in ((10, True), (101, True), (3, False)):
    idx = lm.split_by_document(n, val_fraction=0.1, test_fraction=0.1, seed=3, shuffle=shuffle)
    allidx = np.concatenate([idx["train"], idx["validation"], idx["test"]])
    assert sorted(allidx.tolist()) == list(range(n))
    assert len(idx["validation"]) == max(1, round(0.1 * n)) and len(idx["test"]) >= 1
  idx = lm.split_by_document(20, val_fraction=0.2, test_fraction=0.0, seed=0)
  assert idx["test"] is not idx["validation"] and idx["test"].tolist() == idx["validation"].tolist()
  contiguous = lm.split_by_document(20, val_fraction=0.1, test_fraction=0.1, seed=0, shuffle=False)
  assert contiguous["validation"].tolist() == [16, 17] and contiguous["test"].tolist() == [18, 19]
  with pytest.raises(ValueError, match="too few"):
    lm.split_by_document(2, val_fraction=0.1, test_fraction=0.1, seed=0)
  with pytest.raises(ValueError, match="val_fraction"):
    lm.split_by_document(10, val_fraction=0.0, test_fraction=0.1, seed=0)


@pytest.mark.parametrize("tokenizer", ["byte", "char"])
def test_load_task_splits_without_leakage(corpus_file, tokenizer):
  cfg = dict(task="lm", path=str(corpus_file), tokenizer=tokenizer, seq_len=24,
             val_fraction=0.15, test_fraction=0.15, seed=5)
  spec, splits = data.load_task(cfg)
  assert (spec.kind, spec.input_kind, spec.seq_len) == ("lm", "tokens", 24)
  assert spec.vocab_size == spec.num_classes == (258 if tokenizer == "byte" else splits["train"].info["vocab_size"])
  if tokenizer == "char":  # every character of this corpus occurs in its train split
    assert splits["train"].info["vocab_size"] == 3 + len(set("".join(PARAGRAPHS)))
  tok = lm.ByteTokenizer() if tokenizer == "byte" else lm.CharTokenizer(set("".join(PARAGRAPHS)))
  decoded = {}
  for name, ds in splits.items():
    assert isinstance(ds, lm.LMDataset) and ds["inputs"].max() < spec.vocab_size
    docs = documents_of(unpack(ds))
    decoded[name] = [tok.decode(d) for d in docs]
    info = ds.info
    assert info["num_documents"] == len(docs) and info["num_tokens"] == int(ds["mask"].sum())
    assert info["num_bytes"] == sum(len(d.encode()) for d in decoded[name])
    assert ds.bytes_per_token == pytest.approx(info["num_bytes"] / info["num_tokens"])
  assert len(decoded["test"]) == len(decoded["validation"]) == 6
  every = decoded["train"] + decoded["validation"] + decoded["test"]
  assert sorted(every) == sorted(PARAGRAPHS)  # a partition of the documents: no leakage
  # Determinism: the same config gives the same arrays; another seed another split.
  _, again = data.load_task(cfg)
  for name in splits:
    for key in ("inputs", "targets", "mask"):
      np.testing.assert_array_equal(splits[name][key], again[name][key])
  _, other = data.load_task({**cfg, "seed": 6})
  assert not np.array_equal(other["validation"]["inputs"][:1], splits["validation"]["inputs"][:1])


def test_directory_corpus_and_loader(corpus_dir):
  spec, splits = data.load_task(dict(task="lm", path=str(corpus_dir), seq_len=16,
                                     val_fraction=0.2, test_fraction=0.0))
  assert splits["test"] is splits["validation"]
  assert sum(ds.info["num_documents"] for ds in (splits["train"], splits["validation"])) == 12
  loader = data.pipeline.make_loader(splits["train"], batch_size=2, shuffle=True, seed=0,
                                     drop_remainder=True, prefetch=0)
  batch = next(loader)
  assert set(batch) == {"inputs", "targets", "mask", "weights"}
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_bad_options_fail_clearly(corpus_file, tmp_path):
  with pytest.raises(ValueError, match="unknown config keys"):
    data.load_task(dict(task="lm", path=str(corpus_file), vocab="byte"))
  with pytest.raises(ValueError, match="document_split"):
    data.load_task(dict(task="lm", path=str(corpus_file), document_split="line"))
  with pytest.raises(ValueError, match="seq_len"):
    data.load_task(dict(task="lm", path=str(corpus_file), seq_len=0))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load_task(dict(task="lm", path=str(tmp_path / "nope.txt")))
  with pytest.raises(FileNotFoundError, match="tokenizer file"):
    data.load_task(dict(task="lm", path=str(corpus_file), tokenizer=str(tmp_path / "tok.json")))


def test_subword_tokenizer_missing_package_and_plumbing(corpus_file, tmp_path, monkeypatch):
  tok_file = tmp_path / "tok.json"
  tok_file.write_text("{}")
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
  with pytest.raises(ImportError, match="pip install tokenizers"):
    lm.make_tokenizer(str(tok_file))
  monkeypatch.setitem(sys.modules, "sentencepiece", None)
  (tmp_path / "sp.model").write_bytes(b"")
  with pytest.raises(ImportError, match="pip install sentencepiece"):
    lm.make_tokenizer(str(tmp_path / "sp.model"))

  class FakeTokenizer:  # whitespace words -> ids, the `tokenizers.Tokenizer` surface used
    words = sorted(set(" ".join(PARAGRAPHS).split()))

    @classmethod
    def from_file(cls, path):
      return cls()

    def get_vocab_size(self):
      return len(self.words)

    def encode(self, text):
      return types.SimpleNamespace(ids=[self.words.index(w) for w in text.split()])

    def decode(self, ids):
      return " ".join(self.words[i] for i in ids)

  monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=FakeTokenizer))
  spec, splits = data.load_task(dict(task="lm", path=str(corpus_file), tokenizer=str(tok_file),
                                     seq_len=8, val_fraction=0.1, test_fraction=0.1))
  assert spec.vocab_size == len(FakeTokenizer.words) + 2
  first = documents_of(unpack(splits["train"]))[0]
  assert FakeTokenizer().decode([t - 2 for t in first]) in [" ".join(p.split()) for p in PARAGRAPHS]
  assert splits["train"].bytes_per_token > 2  # words are several bytes each


def test_bits_per_byte():
  assert lm.bits_per_byte(math.log(2.0), 10, 10) == pytest.approx(1.0)
  # 4 bytes per token at ln 256 nats per token: 2 bits per byte.
  assert lm.bits_per_byte(math.log(256.0), 100, 400) == pytest.approx(2.0)
  with pytest.raises(ValueError):
    lm.bits_per_byte(1.0, 10, 0)


def test_shared_tiny_shakespeare():
  if not lm.DEFAULT_PATH.is_file():
    pytest.skip(f"{lm.DEFAULT_PATH} not present")
  raw = lm.DEFAULT_PATH.read_bytes()
  assert len(raw) == 1_115_394
  docs = lm.read_documents(lm.DEFAULT_PATH)
  assert docs[0].startswith("First Citizen:\nBefore we proceed any further")
  spec, splits = data.load_task({"task": "lm"})
  assert (spec.vocab_size, spec.seq_len) == (258, 256)
  infos = [splits[s].info for s in ("train", "validation", "test")]
  assert sum(i["num_documents"] for i in infos) == len(docs)
  # The "\n\n" between paragraphs are the only bytes not in some document.
  assert sum(i["num_bytes"] for i in infos) == sum(len(d.encode()) for d in docs)
  assert len(raw) - sum(i["num_bytes"] for i in infos) == 2 * (len(docs) - 1)
  assert all(i["num_tokens"] == i["num_bytes"] + i["num_documents"] for i in infos)
  _, char_splits = data.load_task({"task": "lm", "tokenizer": "char"})
  assert len(set(raw.decode())) == 65  # char-rnn's vocabulary; a few rare ones may miss train
  assert 3 + 60 <= char_splits["train"].info["vocab_size"] <= 3 + 65


@pytest.mark.slow  # ~20-35 s on 2 shared CPU cores (compiles the tiny model)
def test_tiny_config_trains(corpus_file, tmp_path):
  from configs.lm import shakespeare
  from train import trainer
  config = shakespeare.get_config("s4d,tiny")
  config.data.path = str(corpus_file)
  results = trainer.run(config, str(tmp_path / "work"))
  assert results["steps"] == config.train.num_steps
  # Evaluation scores every target token once: its weight is the split's token count,
  # which with the split's bytes gives bits per byte.
  _, splits = data.load_task(config.data)
  info = splits["validation"].info
  assert results["val_examples"] == info["num_tokens"]
  bpb = lm.bits_per_byte(results["val_loss"], results["val_examples"], info["num_bytes"])
  assert 0 < bpb < 10
  # The trainer reports the same number for text corpora.
  assert results["val_bits_per_byte"] == pytest.approx(bpb)
  assert "test_bits_per_byte" in results


def test_configs_build_and_match_in_size():
  import jax
  from flax import nnx

  import models
  from configs.lm import shakespeare
  from data.task import TaskSpec
  from train import trainer
  task = TaskSpec(name="lm", kind="lm", input_kind="tokens", seq_len=256, num_classes=258,
                  vocab_size=258)
  counts = {}
  for model in shakespeare.MODELS:
    for size in shakespeare.SIZES:
      config = shakespeare.get_config(f"{model},{size}" if size else model)
      trainer.validate_config(config)
      assert config.is_locked and config.data.task == "lm" and not config.model.bidirectional
    config = shakespeare.get_config(model)
    net = nnx.eval_shape(lambda c=config: models.build_model(c.model, task, rngs=nnx.Rngs(0)))
    counts[model] = sum(x.size for x in jax.tree.leaves(nnx.state(net, nnx.Param)))
  assert max(counts.values()) / min(counts.values()) < 1.05, counts
  assert shakespeare.get_config("transformer,long").model.mixer.max_len == 512
  assert set(shakespeare.lm_data(256)) == set(lm.DEFAULTS)  # every lm option is settable
  assert shakespeare.get_config("mamba2").data.segment_ids is False
  with pytest.raises(ValueError, match="unknown model"):
    shakespeare.get_config("s4")


def test_input_pipeline_benchmark_runs(capsys):
  from benchmarks import input_pipeline
  rows = input_pipeline.main(["--quick", "--tasks", "mqar,lm", "--batches", "2", "--batch-size", "4",
                              "--workers", "0"])
  assert [(r["task"], r["prefetch"]) for r in rows] == [("mqar", 0), ("mqar", 2), ("lm", 0), ("lm", 2)]
  assert all(r["ex_per_s"] > 0 for r in rows) and "ex_per_s" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    input_pipeline.main(["--tasks", "nosuchtask"])
