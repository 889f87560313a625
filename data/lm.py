"""Language-modelling corpora: documents -> tokens -> packed fixed-length sequences.

Source (data.path). A directory: every file matching `pattern` below it (recursively,
sorted by relative path) is one document. A tar archive (a path ending in .tar, .tar.gz,
.tgz, .tar.bz2, .tbz2, .tar.xz or .txz): every regular member whose basename matches
`pattern` is one document, in sorted member-name order, streamed out of the archive
member by member (data/archive.py; nothing is extracted to disk). A named corpus
(NAMED_CORPORA; write "./imdb" for a local path of that name):

    "imdb"       ../shared/data/imdb/aclImdb.tar.gz (data/text.py's DEFAULT_SOURCE): the
                 50,000 reviews of aclImdb/{train,test}/{pos,neg}/ (65.5 MB), README and
                 imdb.vocab left out; `pattern` still applies ("*_10.txt": 10-star ones)

Any other single file is split into documents by `document_split`:

    "paragraph"  at blank lines (a newline, optional spaces/tabs/CR, a newline); the
                 blank lines themselves are dropped, empty paragraphs skipped
    "block"      consecutive blocks of `block_size` characters (the last one shorter)

Files and members are read as UTF-8 with errors="surrogateescape", so byte-level tokens
give back the file's exact bytes even where it is not valid UTF-8. Default: the Tiny
Shakespeare file in ../shared/data (never fetched at run time). A damaged archive, or one
without a matching member, is a one-line error naming it and the pattern.

Tokens (data.tokenizer). Ids 0 and 1 are reserved in every vocabulary: 0 is padding,
1 the separator that ends each document.

    "byte"   byte b -> b + 2; vocab_size 258
    "char"   2 <unk>, then the characters of the training documents in code-point order
             from 3; characters seen only in validation/test map to <unk>
    a path   a subword tokenizer file: "*.model" is read with `sentencepiece`, anything
             else as a Hugging Face `tokenizers` JSON; its id i -> i + 2. The package
             is imported only here; ImportError says what to install.

Splits are by document, so no text is shared between them: the document order is
permuted by `seed` (or kept, with shuffle_documents=False, giving a contiguous tail
like char-rnn's), the last round(test_fraction * n) documents go to test, the
round(val_fraction * n) before them to validation (at least one each when the
fraction is > 0), the rest to train. With test_fraction=0 the test split is the
validation split. IMDB's held-out reviews are this permutation's too (its own
train/test folders are not used as splits): the GPT-2-small recipes set
val_fraction=0.01, test_fraction=0.01, i.e. 500 reviews each and 49,000 for training.

Packing. A split's documents, each followed by the separator, are concatenated after a
leading separator: [1, d0..., 1, d1..., 1, ...]. The stream is cut into windows of
seq_len + 1 tokens overlapping by one, so example j has inputs = s[j L : j L + L],
targets = s[j L + 1 : j L + L + 1]: every token after the leading separator is a target
exactly once (the separators too: ending a document is part of the model).
The last window is padded with 0 and its padded targets get mask False.

Segment ids (data.segment_ids=True). Every split also holds "segment_ids" (n, seq_len)
int32, the document of each input position, for mixers that restart their state at
document boundaries (`takes_segments`: mamba2, lightning, linear_attention; the others
refuse them). The separator before a document belongs to that document (the model
predicts its first token from the separator, with a fresh state), so the id goes up by
one at every separator among the inputs and nowhere else. Ids are relative to the
window (0 at its first position, whether that is a separator or the middle of a
document); only where they change matters. The padded tail continues the last id.
inputs/targets/mask are the same with and without the option.

Load time (measured on this project's 2-core CPU machine, shared with other jobs):
`data.load_task(dict(task="lm", path="imdb", seq_len=2048, val_fraction=0.01,
test_fraction=0.01))` gives 65,533,508 byte tokens (65,483,508 bytes + 50,000
separators) in 32,000 windows (31,374 train, 314 validation, 312 test). The first call
takes about 25 s: streaming the 29.5 MB tarball (about 5 s) and preparing the TFDS
dataset of documents once (data/builders.py); later calls about 9-10 s (segment_ids
included): reading the 50,000 prepared documents back (most of it: TFDS decodes record
by record) and tokenizing and packing them with NumPy. The prepared documents are the
cache; the packed arrays (about 0.6 GB, 0.85 GB with segment_ids, at any seq_len)
are made when read.

Bits per byte. Every split is an `LMDataset` whose `info` holds num_documents,
num_tokens (targets with mask True), num_bytes (UTF-8 bytes of the split's documents;
separators count 0) and bytes_per_token = num_bytes / num_tokens. A mean loss of
`loss` nats per scored token is `bits_per_byte(loss, num_tokens, num_bytes)` =
loss * num_tokens / (num_bytes * ln 2) bits per byte of text: the cost of predicting
document ends is charged to the text, so byte-level bpb sits slightly above loss/ln 2.
"""

from __future__ import annotations

import fnmatch
import math
import posixpath
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from data import archive
from data.pipeline import ArrayDataset
from data.task import TaskSpec
from data.text import DEFAULT_SOURCE as IMDB_SOURCE

PAD_ID, SEP_ID, UNK_ID = 0, 1, 2
NUM_RESERVED = 2         # pad, separator (byte and subword ids start here)
BYTE_VOCAB_SIZE = 256 + NUM_RESERVED
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_PATH = SHARED_DATA / "tinyshakespeare" / "input.txt"


class NamedCorpus(NamedTuple):
  """A corpus data.path may name: an archive and the member names (regex) that are documents."""

  path: Path
  members: str
  about: str


NAMED_CORPORA = {
    "imdb": NamedCorpus(IMDB_SOURCE, r"^aclImdb/(?:train|test)/(?:pos|neg)/[^/]+$",
                        "the 50,000 IMDB reviews (Maas et al. 2011)"),
}
IMDB_REVIEWS = 50_000

DEFAULTS: dict[str, Any] = dict(
    task="lm",
    path=None,                  # text file, directory, tar archive or "imdb"; None: Tiny Shakespeare
    pattern="*.txt",            # files of a directory / members of an archive that are documents
    document_split="paragraph",  # single file: "paragraph" | "block"
    block_size=4096,            # characters per document with document_split="block"
    tokenizer="byte",           # "byte" | "char" | path of a tokenizers JSON / sentencepiece model
    seq_len=256,
    val_fraction=0.05,
    test_fraction=0.05,
    shuffle_documents=True,
    seed=0,
    segment_ids=False,          # also give "segment_ids" (n, seq_len) int32: document of each input
)

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n")
_DOCUMENT_SPLITS = ("paragraph", "block")


class LMDataset(ArrayDataset):
  """ArrayDataset of packed sequences plus `info` (corpus statistics, see module docstring)."""

  def __init__(self, arrays, info: dict):
    super().__init__(arrays)
    self.info = dict(info)

  @property
  def bytes_per_token(self) -> float:
    return self.info["bytes_per_token"]


def bits_per_byte(mean_loss_nats_per_token: float, tokens: int, bytes: int) -> float:  # noqa: A002
  """Bits per byte of text from a mean cross-entropy in nats per scored token.

  total nats = mean_loss * tokens; bits = nats / ln 2; divided by the text's bytes.
  """
  if tokens < 0 or bytes <= 0:
    raise ValueError(f"bits_per_byte needs tokens >= 0 and bytes > 0, got {tokens}, {bytes}")
  return float(mean_loss_nats_per_token) * tokens / (bytes * math.log(2.0))


# -- documents ---------------------------------------------------------------------------

def _read_text(path: Path) -> str:
  return path.read_bytes().decode("utf-8", errors="surrogateescape")


def split_documents(text: str, mode: str, block_size: int = 4096) -> list[str]:
  """One file's text -> documents ("paragraph" or "block"; see module docstring)."""
  if mode == "paragraph":
    return [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
  if mode == "block":
    if block_size < 1:
      raise ValueError(f"lm block_size must be >= 1, got {block_size}")
    return [text[i:i + block_size] for i in range(0, len(text), block_size)]
  raise ValueError(f"unknown lm document_split {mode!r}; valid: {list(_DOCUMENT_SPLITS)}")


def resolve_path(path) -> tuple[Path, str | None]:
  """data.path -> (file, folder or archive; member-name regex of a named corpus or None)."""
  if path is None:
    return DEFAULT_PATH, None
  if isinstance(path, str) and path in NAMED_CORPORA:
    corpus = NAMED_CORPORA[path]
    return corpus.path, corpus.members
  return Path(path).expanduser(), None


def _selector(pattern: str, members: str | None):
  regex = re.compile(members) if members else None
  return lambda name: (fnmatch.fnmatch(posixpath.basename(name), pattern)
                       and (regex is None or regex.search(name) is not None))


def archive_members(path, *, pattern: str = "*.txt", members: str | None = None,
                    names_only: bool = False) -> list[tuple[str, bytes | None]]:
  """(name, bytes) of an archive's documents, sorted by name (bytes None with names_only).

  Raises:
    DataError: a damaged or unreadable archive.
    FileNotFoundError: no member matches pattern (and members, a regex on the full name).
  """
  what = f" and {members!r}" if members else ""
  found = archive.read_members(path, _selector(pattern, members), names_only=names_only,
                               what="lm corpus archive ",
                               hint=f"; its members matching {pattern!r}{what} are the documents")
  if not found:
    raise FileNotFoundError(f"lm corpus archive {path} holds no files matching {pattern!r}{what} "
                            "(each such member is one document); set data.pattern or data.path")
  return sorted(found, key=lambda item: item[0])


def read_documents(path, *, pattern: str = "*.txt", document_split: str = "paragraph",
                   block_size: int = 4096, members: str | None = None) -> list[str]:
  """Documents of a file, a directory, an archive or a named corpus (see module docstring).

  members: a regex on an archive member's full name, which must also match (set by a
  named corpus).

  Raises:
    FileNotFoundError: path missing, or a directory or archive without files matching
      pattern.
    DataError: a damaged or unreadable archive.
  """
  if isinstance(path, str) and path in NAMED_CORPORA:
    path, members = resolve_path(path)
  path = Path(path)
  if path.is_dir():
    files = sorted((p for p in path.rglob(pattern) if p.is_file()),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
      raise FileNotFoundError(f"lm corpus directory {path} holds no files matching {pattern!r} "
                              "(each such file is one document); set data.pattern or data.path")
    return [_read_text(f) for f in files]
  if path.is_file() and archive.is_archive(path):
    return [data.decode("utf-8", errors="surrogateescape")
            for _, data in archive_members(path, pattern=pattern, members=members)]
  if path.is_file():
    return split_documents(_read_text(path), document_split, block_size)
  named = [f"the {name!r} corpus, {c.about}" for name, c in NAMED_CORPORA.items() if path == c.path]
  hint = (" (the default Tiny Shakespeare corpus; see ../shared/data/README.md)"
          if path == DEFAULT_PATH else
          f" ({named[0]}; see ../shared/data/README.md)" if named else "")
  raise FileNotFoundError(f"lm corpus {path} does not exist{hint}; set data.path to a text "
                          "file, a directory of text files, a tar archive or one of "
                          f"{sorted(NAMED_CORPORA)}")


def split_by_document(num_documents: int, *, val_fraction: float, test_fraction: float,
                      seed: int, shuffle: bool = True) -> dict[str, np.ndarray]:
  """Document indices of each split (disjoint, covering 0..n-1; see module docstring)."""
  for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
    if not 0 <= f < 1:
      raise ValueError(f"lm {name} must be in [0, 1), got {f!r}")
  if val_fraction <= 0:
    raise ValueError("lm val_fraction must be > 0 (the trainer evaluates on validation)")
  n = num_documents

  def count(f):
    return max(1, round(f * n)) if f > 0 else 0

  n_val, n_test = count(val_fraction), count(test_fraction)
  if n - n_val - n_test < 1:
    raise ValueError(f"lm corpus has {n} document(s): too few for a train split with "
                     f"val_fraction={val_fraction}, test_fraction={test_fraction}; use more "
                     "documents (e.g. document_split='block' with a smaller block_size)")
  order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
  n_train = n - n_val - n_test
  train, val, test = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
  return {"train": np.sort(train), "validation": np.sort(val),
          "test": np.sort(test) if n_test else np.sort(val)}


# -- tokenizers --------------------------------------------------------------------------

class ByteTokenizer:
  """UTF-8 (surrogateescape) bytes, id = byte + 2."""

  name = "byte"
  vocab_size = BYTE_VOCAB_SIZE

  def encode(self, text: str) -> np.ndarray:
    data = text.encode("utf-8", errors="surrogateescape")
    return np.frombuffer(data, np.uint8).astype(np.int32) + NUM_RESERVED

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    ids = ids[ids >= NUM_RESERVED] - NUM_RESERVED
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="surrogateescape")


class CharTokenizer:
  """Characters of a training text in code-point order from id 3; others -> <unk> (2)."""

  name = "char"

  def __init__(self, chars):
    self.chars = sorted(set(chars))
    self._codes = np.array([ord(c) for c in self.chars], np.int64)
    self.vocab_size = 3 + len(self.chars)

  @classmethod
  def fit(cls, documents) -> "CharTokenizer":
    seen = set()
    for d in documents:
      seen.update(d)
    return cls(seen)

  def encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), np.uint32).astype(np.int64)
    pos = np.searchsorted(self._codes, codes)
    pos = np.minimum(pos, max(len(self._codes) - 1, 0))
    known = self._codes[pos] == codes if len(self._codes) else np.zeros(codes.shape, bool)
    return np.where(known, pos + 3, UNK_ID).astype(np.int32)

  def decode(self, ids) -> str:
    return "".join(self.chars[i - 3] if i >= 3 else ("\ufffd" if i == UNK_ID else "")
                   for i in np.asarray(ids).tolist())


class SubwordTokenizer:
  """A `tokenizers` JSON or a `sentencepiece` model; id = tokenizer id + 2."""

  name = "subword"

  def __init__(self, path):
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"lm tokenizer file {path} does not exist (data.tokenizer is "
                              "'byte', 'char' or a tokenizer file path)")
    if path.suffix == ".model":
      try:
        import sentencepiece  # noqa: PLC0415 (optional dependency)
      except ImportError as e:
        raise ImportError(f"data.tokenizer={str(path)!r} is a sentencepiece model; "
                          "`pip install sentencepiece` to use it") from e
      sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
      self._encode = lambda text: sp.encode(text)
      self._decode = lambda ids: sp.decode(ids)
      size = sp.get_piece_size()
    else:
      try:
        import tokenizers  # noqa: PLC0415 (optional dependency)
      except ImportError as e:
        raise ImportError(f"data.tokenizer={str(path)!r} is a Hugging Face tokenizers file; "
                          "`pip install tokenizers` to use it") from e
      tok = tokenizers.Tokenizer.from_file(str(path))
      self._encode = lambda text: tok.encode(text).ids
      self._decode = lambda ids: tok.decode(ids)
      size = tok.get_vocab_size()
    self.vocab_size = int(size) + NUM_RESERVED

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._encode(text), np.int32).reshape(-1) + NUM_RESERVED

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return self._decode((ids[ids >= NUM_RESERVED] - NUM_RESERVED).tolist())


def make_tokenizer(spec: str, train_documents=()):
  """"byte", "char" (fitted on train_documents) or a tokenizer file path."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"lm tokenizer must be 'byte', 'char' or a file path, got {spec!r}")
  if spec == "byte":
    return ByteTokenizer()
  if spec == "char":
    return CharTokenizer.fit(train_documents)
  return SubwordTokenizer(spec)


# -- packing -----------------------------------------------------------------------------

def pack(token_docs, seq_len: int, *, segment_ids: bool = False) -> dict[str, np.ndarray]:
  """Documents' ids (list of 1-D int arrays) -> inputs/targets/mask (n, seq_len).

  See the module docstring for the layout; n = ceil((stream length - 1) / seq_len).
  segment_ids: also "segment_ids" (n, seq_len) int32, +1 at each separator of the
  inputs, 0 at each window's first position.
  """
  if seq_len < 1:
    raise ValueError(f"lm seq_len must be >= 1, got {seq_len}")
  sep = np.array([SEP_ID], np.int32)
  pieces = [sep]
  for d in token_docs:
    pieces += [np.asarray(d, np.int32).reshape(-1), sep]
  length = sum(len(p) for p in pieces)  # the stream [1, d0..., 1, d1..., 1, ...]
  n = max(1, -(-(length - 1) // seq_len))
  padded = np.zeros(n * seq_len + 1, np.int32)
  np.concatenate(pieces, out=padded[:length])
  inputs = padded[:-1].reshape(n, seq_len)
  mask = np.zeros(n * seq_len, bool)
  mask[:length - 1] = True
  out = {"inputs": inputs.copy(), "targets": padded[1:].reshape(n, seq_len).copy(),
         "mask": mask.reshape(n, seq_len)}
  if segment_ids:
    seg = np.cumsum(inputs == SEP_ID, axis=1, dtype=np.int32)
    out["segment_ids"] = seg - seg[:, :1]
  return out


def _check_int(name, v, low):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
    raise ValueError(f"lm {name} must be an int >= {low}, got {v!r}")


def check_options(opts: dict) -> None:
  """ValueError naming the first bad option (before anything is read)."""
  _check_int("seq_len", opts["seq_len"], 1)
  _check_int("seed", opts["seed"], 0)
  _check_int("block_size", opts["block_size"], 1)
  if opts["document_split"] not in _DOCUMENT_SPLITS:
    raise ValueError(f"unknown lm document_split {opts['document_split']!r}; "
                     f"valid: {list(_DOCUMENT_SPLITS)}")
  for name in ("val_fraction", "test_fraction"):
    v = opts[name]
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
        or not 0 <= v < 1:
      raise ValueError(f"lm {name} must be in [0, 1), got {v!r}")
  if opts["val_fraction"] <= 0:
    raise ValueError("lm val_fraction must be > 0 (the trainer evaluates on validation)")
  if not isinstance(opts["segment_ids"], (bool, np.bool_)):
    raise ValueError(f"lm segment_ids must be True or False, got {opts['segment_ids']!r}")


def build_splits(docs: dict[str, list[str]], opts: dict) -> tuple[TaskSpec, dict[str, LMDataset]]:
  """Each split's documents -> (spec, packed LMDatasets); no "test" in docs: test is validation.

  The tokenizer is made (a "char" one fitted) on docs["train"]; opts: tokenizer, seq_len,
  segment_ids.
  """
  tokenizer = make_tokenizer(opts["tokenizer"], docs["train"])
  splits = {}
  for name in ("train", "validation", "test"):
    if name not in docs:
      splits[name] = splits["validation"]  # the same object: evaluated once, not twice
      continue
    arrays = pack([tokenizer.encode(d) for d in docs[name]], opts["seq_len"],
                  segment_ids=bool(opts["segment_ids"]))
    num_tokens = int(arrays["mask"].sum())
    num_bytes = sum(len(d.encode("utf-8", errors="surrogateescape")) for d in docs[name])
    splits[name] = LMDataset(arrays, dict(
        num_documents=len(docs[name]), num_tokens=num_tokens, num_bytes=num_bytes,
        bytes_per_token=num_bytes / max(num_tokens, 1), tokenizer=tokenizer.name,
        vocab_size=tokenizer.vocab_size))
  spec = TaskSpec(name="lm", kind="lm", input_kind="tokens", seq_len=opts["seq_len"],
                  num_classes=tokenizer.vocab_size, vocab_size=tokenizer.vocab_size)
  return spec, splits


def load_task(data_cfg) -> tuple[TaskSpec, dict[str, LMDataset]]:
  """LM corpus for `data.load_task`; data_cfg keys and defaults: see DEFAULTS."""
  from data.registry import task_options  # late: the registry imports this module lazily
  opts = task_options(data_cfg, DEFAULTS)
  check_options(opts)
  path, members = resolve_path(opts["path"])
  docs = read_documents(path, pattern=opts["pattern"], document_split=opts["document_split"],
                        block_size=opts["block_size"], members=members)
  index = split_by_document(len(docs), val_fraction=opts["val_fraction"],
                            test_fraction=opts["test_fraction"], seed=opts["seed"],
                            shuffle=bool(opts["shuffle_documents"]))
  if not opts["test_fraction"]:
    del index["test"]  # the test split is the validation split
  return build_splits({name: [docs[i] for i in idx] for name, idx in index.items()}, opts)
