"""The benchmark workloads: real data, a small model, a loss and a metric.

Each keeps its training set on the device and samples batches inside the
compiled step, so a run is a few ``lax.scan`` dispatches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optax_sm3
from benchmarks import _data

# The main benchmark's workloads (``python -m benchmarks``).
WORKLOAD_NAMES = ("movielens", "shakespeare-word", "shakespeare-char", "mnist")
# Further workloads of the recipe's transfer study (``benchmarks.transfer``).
TRANSFER_NAMES = (
  "code-char",
  "wiki-word",
  "cmudict-syllables",
  "digits-conv",
  "speeches-bow",
  "wiki-hashed",
)


@dataclasses.dataclass(frozen=True)
class Workload:
  """A training problem.

  Attributes:
    name: its name in :data:`WORKLOAD_NAMES` or :data:`TRANSFER_NAMES`.
    metric: the metric's name, e.g. ``"test RMSE"``.
    higher_is_better: whether a larger metric is better.
    init: ``init(key)`` returns the parameters.
    loss: ``loss(params, batch)`` returns the scalar training loss.
    sample: ``sample(key, train)`` draws a batch from the first
      ``train["pool"]`` rows of ``train``.
    evaluate: ``evaluate(params, split)`` returns the metric on a split.
    steps: the default number of training steps.
    tables: ``None``, or a function of the parameters giving the boolean
      mask of the embedding tables that ``loss`` reads only through
      :func:`optax_sm3.sparse_lookup` (which SM3 may train row-sparsely).
    train: the training arrays, validation rows last (keyword-only, as are
      the three below: :func:`_carve`'s splits); the runner passes
      ``sample`` them with the scalar ``pool``.
    valid: the validation split (the last ``num_valid`` training rows).
    test: the test split, used only for the final runs.
    num_valid: the number of validation rows.
  """

  name: str
  metric: str
  higher_is_better: bool
  init: Callable[[jax.Array], Any]
  loss: Callable[[Any, Any], jax.Array]
  sample: Callable[[jax.Array, dict], Any]
  evaluate: Callable[[Any, dict], jax.Array]
  steps: int
  tables: Callable[[Any], Any] | None = None
  _: dataclasses.KW_ONLY
  train: dict
  valid: dict
  test: dict
  num_valid: int


def _carve(data: dict, keys, valid_fraction: float, seed: int = 1) -> dict:
  """The splits of ``data``'s ``train_<key>`` rows, shuffled (the last ones
  the validation split), and its ``test_<key>`` rows."""
  train = {k: data[f"train_{k}"] for k in keys}
  size = len(next(iter(train.values())))
  order = np.random.default_rng(seed).permutation(size)
  num_valid = round(valid_fraction * size)
  train = {k: v[order] for k, v in train.items()}
  valid = {k: v[size - num_valid :] for k, v in train.items()}
  test = {k: data[f"test_{k}"] for k in keys}
  return {"train": train, "valid": valid, "test": test, "num_valid": num_valid}


def _normal(key, shape, scale):
  return scale * jax.random.normal(key, shape, jnp.float32)


def _dense_init(key, fan_in, fan_out):
  return _normal(key, (fan_in, fan_out), 1.0 / math.sqrt(fan_in))


def _rows(key, train, batch_size):
  return jax.random.randint(key, (batch_size,), 0, train["pool"])


def _cross_entropy(logits, labels):
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def movielens(dim: int = 128, batch_size: int = 1024, l2: float = 0.05) -> Workload:
  """Matrix factorisation of MovieLens-100k ratings; metric test RMSE."""
  data = _data.load_movielens()
  mean = float(data["train_ratings"].mean())
  keys = ("users", "items", "ratings")
  splits = _carve(data, keys, 0.1)

  def init(key):
    ku, ki = jax.random.split(key)
    return {
      "user_embedding": _normal(ku, (data["num_users"], dim), 0.1),
      "item_embedding": _normal(ki, (data["num_items"], dim), 0.1),
      "user_bias": jnp.zeros((data["num_users"],), jnp.float32),
      "item_bias": jnp.zeros((data["num_items"],), jnp.float32),
    }

  def predict(params, users, items):
    u = params["user_embedding"][users]
    v = params["item_embedding"][items]
    bias = params["user_bias"][users] + params["item_bias"][items]
    return jnp.sum(u * v, axis=-1) + bias + mean, u, v

  def loss(params, batch):
    pred, u, v = predict(params, batch["users"], batch["items"])
    penalty = jnp.mean(jnp.sum(u * u, axis=-1) + jnp.sum(v * v, axis=-1))
    return jnp.mean((pred - batch["ratings"]) ** 2) + l2 * penalty

  def sample(key, train):
    rows = _rows(key, train, batch_size)
    return {k: train[k][rows] for k in keys}

  def evaluate(params, split):
    pred, _, _ = predict(params, split["users"], split["items"])
    pred = jnp.clip(pred, 1.0, 5.0)
    return jnp.sqrt(jnp.mean((pred - split["ratings"]) ** 2))

  return Workload(
    "movielens", "test RMSE", False, init, loss, sample, evaluate, 3000, **splits
  )


def _chunked_mean(fn, rows, size: int = 32):
  """Mean of ``fn`` over whole chunks of ``size`` rows (bounds the logits' memory);
  fewer rows are evaluated at once."""
  if rows.shape[0] < size:
    return fn(rows)
  whole = rows.shape[0] // size * size
  chunks = rows[:whole].reshape(whole // size, size, *rows.shape[1:])
  return jnp.mean(jax.lax.map(fn, chunks))


def _lm_splits(data: dict, eval_rows: int) -> dict:
  """10% of the rows for validation; at most ``eval_rows`` of them (twice as
  many test rows) evaluated."""
  tokens = {"train_tokens": data["train"], "test_tokens": data["test"]}
  splits = _carve(tokens, ("tokens",), 0.1)
  for split, limit in (("valid", eval_rows), ("test", 2 * eval_rows)):
    rows = splits[split]["tokens"]
    if len(rows) > limit:
      rows = rows[np.random.default_rng(2).choice(len(rows), limit, replace=False)]
    splits[split] = {"tokens": rows}
  return splits


def _ngram_model(
  name, data, context, init, logits, batch_size, steps, eval_rows, tables=None
) -> Workload:
  """Next token from the ``context`` before it, scored on every window of (at
  most) ``eval_rows`` rows; metric held-out cross-entropy."""
  width = data["train"].shape[1]
  splits = _lm_splits(data, eval_rows)
  offsets = np.arange(-context, 1)[None, :]

  def loss(params, windows):
    return _cross_entropy(logits(params, windows[:, :-1]), windows[:, -1])

  def sample(key, train):
    kr, kp = jax.random.split(key)
    rows = train["tokens"][_rows(kr, train, batch_size)]
    pos = jax.random.randint(kp, (batch_size,), context, width)
    return jnp.take_along_axis(rows, pos[:, None] + offsets, axis=1)

  def evaluate(params, split):
    windows = np.arange(context, width)[:, None] + offsets

    def rows_loss(rows):
      return loss(params, rows[:, windows].reshape(-1, context + 1))

    return _chunked_mean(rows_loss, split["tokens"])

  return Workload(
    name, "test loss", False, init, loss, sample, evaluate, steps, tables, **splits
  )


def shakespeare_word(
  context: int = 3, dim: int = 64, hidden: int = 128, batch_size: int = 128
) -> Workload:
  """A word-level neural n-gram LM (Bengio et al., 2003); held-out cross-entropy."""
  data = _data.load_text("shakespeare")
  vocab = data["vocab_size"]

  def init(key):
    k = jax.random.split(key, 3)
    return {
      "embedding": _normal(k[0], (vocab, dim), 0.1),
      "hidden": _dense_init(k[1], context * dim, hidden),
      "hidden_bias": jnp.zeros((hidden,), jnp.float32),
      "softmax": _dense_init(k[2], hidden, vocab),
      "softmax_bias": jnp.zeros((vocab,), jnp.float32),
    }

  def logits(params, contexts):
    x = params["embedding"][contexts].reshape(contexts.shape[0], context * dim)
    h = jnp.tanh(x @ params["hidden"] + params["hidden_bias"][None, :])
    return h @ params["softmax"] + params["softmax_bias"][None, :]

  return _ngram_model(
    "shakespeare-word", data, context, init, logits, batch_size, 600, 256
  )


def _layer_norm(x, scale):
  x = x - jnp.mean(x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * scale


def _transformer_init(key, vocab, dim, layers, length, outputs):
  """Embedding, positions and blocks; an ``unembedding`` unless ``outputs`` is 0."""
  k = iter(jax.random.split(key, 3 + 4 * layers))
  params = {
    "embedding": _normal(next(k), (vocab, dim), 0.1),
    "position": _normal(next(k), (length, dim), 0.1),
    "final_norm": jnp.ones((dim,), jnp.float32),
  }
  if outputs:
    params["unembedding"] = _dense_init(next(k), dim, outputs)
  for i in range(layers):
    params[f"block{i}"] = {
      "norm1": jnp.ones((dim,), jnp.float32),
      "qkv": _dense_init(next(k), dim, 3 * dim),
      "out": _dense_init(next(k), dim, dim) / math.sqrt(2 * layers),
      "norm2": jnp.ones((dim,), jnp.float32),
      "up": _dense_init(next(k), dim, 4 * dim),
      "down": _dense_init(next(k), 4 * dim, dim) / math.sqrt(2 * layers),
    }
  return params


def _transformer(params, tokens, mask, layers, heads):
  """A pre-norm transformer's final features; ``mask``: which keys each query sees."""
  b, length = tokens.shape
  dim = params["embedding"].shape[1]
  x = params["embedding"][tokens] + params["position"][None, :length, :]
  for i in range(layers):
    p = params[f"block{i}"]
    h = _layer_norm(x, p["norm1"][None, None, :]) @ p["qkv"]
    q, k, v = jnp.split(h.reshape(b, length, 3 * heads, dim // heads), 3, axis=2)
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim // heads)
    att = jax.nn.softmax(jnp.where(mask[:, None], att, -1e9), axis=-1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, length, dim) @ p["out"]
    h = _layer_norm(x, p["norm2"][None, None, :])
    x = x + jax.nn.gelu(h @ p["up"]) @ p["down"]
  return _layer_norm(x, params["final_norm"][None, None, :])


def _language_model(
  name: str,
  data: dict,
  *,
  dim: int = 64,
  layers: int = 2,
  heads: int = 4,
  batch_size: int = 32,
  length: int = 32,
  tied: bool = False,
  steps: int = 400,
) -> Workload:
  """A causal transformer LM (``tied``: unembedding = the embedding's transpose)
  on ``data``'s windows; metric held-out cross-entropy."""
  # Rows are cut to `length + 1` tokens to keep attention cheap on a CPU.
  data = data | {k: data[k][:, : length + 1] for k in ("train", "test")}
  vocab = data["vocab_size"]
  splits = _lm_splits(data, 256)
  mask = np.tril(np.ones((1, length, length), bool))

  def init(key):
    return _transformer_init(key, vocab, dim, layers, length, 0 if tied else vocab)

  def logits(params, tokens):
    x = _transformer(params, tokens, mask, layers, heads)
    return x @ (params["embedding"].T if tied else params["unembedding"])

  def loss(params, batch):
    return _cross_entropy(logits(params, batch[:, :-1]), batch[:, 1:])

  def sample(key, train):
    return train["tokens"][_rows(key, train, batch_size)]

  def evaluate(params, split):
    return _chunked_mean(lambda r: loss(params, r), split["tokens"])

  return Workload(
    name, "test loss", False, init, loss, sample, evaluate, steps, **splits
  )


def shakespeare_char(**sizes) -> Workload:
  """A small character-level transformer (``sizes``: :func:`_language_model`'s)."""
  return _language_model(
    "shakespeare-char", _data.load_text("shakespeare", "char", vocab_size=None), **sizes
  )


def code_char(**sizes) -> Workload:
  """A character-level transformer on SymPy's source; held-out cross-entropy."""
  return _language_model(
    "code-char", _data.load_text("code", "char", vocab_size=100), **sizes
  )


def wiki_word(vocab_size: int = 2048, **sizes) -> Workload:
  """A word-level transformer on Wikipedia with tied input/output embeddings."""
  data = _data.load_text("wikipedia", vocab_size=vocab_size)
  return _language_model("wiki-word", data, tied=True, **{"batch_size": 16} | sizes)


_SYLLABLE_CLASSES = 10  # 0 to 9 syllables; the dictionary's words have at most 8


def cmudict_syllables(
  dim: int = 64,
  layers: int = 2,
  heads: int = 4,
  batch_size: int = 32,
  steps: int = 400,
) -> Workload:
  """A non-causal transformer classifies words by syllable count; test accuracy."""
  data = _data.load_cmudict()
  data |= {k: data[k][:4096] for k in ("test_words", "test_labels")}
  length = data["train_words"].shape[1]

  def init(key):
    return _transformer_init(
      key, data["alphabet_size"], dim, layers, length, _SYLLABLE_CLASSES
    )

  def logits(params, words):
    present = words > 0
    mask = present[:, None, :] | ~present[:, :, None]  # padding sees all
    x = _transformer(params, words, mask, layers, heads)
    pooled = jnp.sum(x * present[..., None], axis=1) / jnp.sum(
      present, axis=1, keepdims=True
    )
    return pooled @ params["unembedding"]

  return _classifier(
    "cmudict-syllables", data, "words", 0.05, init, logits, batch_size, steps, 512
  )


def _classifier(
  name, data, inputs, valid_fraction, init, logits, batch_size, steps, chunk=None
) -> Workload:
  """A classifier of ``data``'s ``{train,test}_{inputs}`` by its ``_labels``; test
  accuracy. With ``chunk``, the splits are cut to and scored in whole chunks."""
  keys = (inputs, "labels")
  splits = _carve(data, keys, valid_fraction)
  if chunk:
    for split in ("valid", "test"):
      splits[split] = {
        k: v[: len(v) // chunk * chunk] for k, v in splits[split].items()
      }

  def loss(params, batch):
    return _cross_entropy(logits(params, batch[inputs]), batch["labels"])

  def sample(key, train):
    rows = _rows(key, train, batch_size)
    return {k: train[k][rows] for k in keys}

  def evaluate(params, split):
    if not chunk:
      predicted = jnp.argmax(logits(params, split[inputs]), axis=-1)
      return jnp.mean((predicted == split["labels"]).astype(jnp.float32))

    def accuracy(rows):
      return jnp.mean(jnp.argmax(logits(params, rows[:, :-1]), -1) == rows[:, -1])

    rows = jnp.concatenate([split[inputs], split["labels"][:, None]], axis=1)
    return _chunked_mean(accuracy, rows, size=chunk)

  return Workload(
    name, "test accuracy", True, init, loss, sample, evaluate, steps, **splits
  )


def mnist(batch_size: int = 128) -> Workload:
  """A 784-512-256-10 ReLU MLP on the 5k MNIST subset; metric test accuracy."""
  data = _data.load_mnist()
  sizes = (784, 512, 256, 10)

  def init(key):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
      {"w": _dense_init(k, m, n), "b": jnp.zeros((n,), jnp.float32)}
      for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

  def logits(params, x):
    for i, layer in enumerate(params):
      x = x @ layer["w"] + layer["b"][None, :]
      if i < len(params) - 1:
        x = jax.nn.relu(x)
    return x

  return _classifier("mnist", data, "images", 0.1, init, logits, batch_size, 1000)


def _conv(x, kernel):
  """A 3x3 'same' convolution as one matmul over patches (XLA's CPU conv is slow here)."""
  _, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = [x[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
  return jnp.concatenate(patches, axis=-1) @ kernel.reshape(9 * c, -1)


def digits_conv(channels: int = 16, batch_size: int = 64, steps: int = 600) -> Workload:
  """Two 3x3 convolutions, 2x2 pooling and a linear layer on 8x8 digits; test accuracy."""
  data = _data.load_digits()

  def init(key):
    k = jax.random.split(key, 3)
    return {
      "conv1": _normal(k[0], (3, 3, 1, channels), 1.0 / 3.0),
      "bias1": jnp.zeros((channels,), jnp.float32),
      "conv2": _normal(
        k[1], (3, 3, channels, 2 * channels), 1.0 / math.sqrt(9 * channels)
      ),
      "bias2": jnp.zeros((2 * channels,), jnp.float32),
      "dense": _dense_init(k[2], 16 * 2 * channels, 10),
      "dense_bias": jnp.zeros((10,), jnp.float32),
    }

  def logits(params, images):
    x = images[..., None]
    x = jax.nn.relu(_conv(x, params["conv1"]) + params["bias1"][None, None, None, :])
    x = jax.nn.relu(_conv(x, params["conv2"]) + params["bias2"][None, None, None, :])
    b = x.shape[0]
    x = x.reshape(b, 4, 2, 4, 2, -1).mean(axis=(2, 4)).reshape(b, -1)
    return x @ params["dense"] + params["dense_bias"][None, :]

  return _classifier(
    "digits-conv", data, "images", 0.2, init, logits, batch_size, steps
  )


def _table_and_head(key, table: str, rows: int, dim: int, outputs: int) -> dict:
  """A ``rows x dim`` table named ``table`` and a linear head (``out``) to ``outputs``."""
  k = jax.random.split(key)
  return {
    table: _normal(k[0], (rows, dim), 0.1),
    "out": _dense_init(k[1], dim, outputs),
    "out_bias": jnp.zeros((outputs,), jnp.float32),
  }


def speeches_bow(
  dim: int = 64, batch_size: int = 128, steps: int = 2000, **data
) -> Workload:
  """A fastText-style classifier of speeches by play (38 plays); test accuracy."""
  data = _data.load_speeches(**data)
  buckets = int(data["train_ids"].max())  # the padding id
  classes = data["num_classes"]

  def init(key):
    return _table_and_head(key, "embedding", buckets, dim, classes)

  def logits(params, ids):
    present = ids < buckets
    rows = params["embedding"][jnp.minimum(ids, buckets - 1)] * present[..., None]
    x = jnp.sum(rows, axis=1) / jnp.maximum(jnp.sum(present, axis=1), 1)[:, None]
    return x @ params["out"] + params["out_bias"][None, :]

  return _classifier(
    "speeches-bow", data, "ids", 0.1, init, logits, batch_size, steps, 256
  )


_SALTS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)


def _hash_contexts(words, rows):
  """Row ids of the unigram, bigram and trigram ending at each of ``words``' last axis."""
  h = jnp.zeros(words.shape[:-1], jnp.uint32)
  ids = []
  for i, salt in enumerate(_SALTS):
    h = (h ^ words[..., -1 - i].astype(jnp.uint32)) * jnp.uint32(salt)
    h = h ^ (h >> 15)
    ids.append((h % jnp.uint32(rows)).astype(jnp.int32))
  return jnp.stack(ids, axis=-1)


def wiki_hashed(
  rows: int = 2**18,
  dim: int = 16,
  vocab_size: int = 4096,
  batch_size: int = 256,
  steps: int = 800,
) -> Workload:
  """Next word from 1-, 2- and 3-word contexts hashed into a ``rows``-row table
  (read through :func:`optax_sm3.sparse_lookup`); held-out cross-entropy."""
  data = _data.load_text("wikipedia", vocab_size=vocab_size)
  vocab = data["vocab_size"]

  def init(key):
    return _table_and_head(key, "table", rows, dim, vocab)

  def logits(params, contexts):
    x = optax_sm3.sparse_lookup(params["table"], _hash_contexts(contexts, rows))
    return jnp.sum(x, axis=-2) @ params["out"] + params["out_bias"][None, :]

  def tables(params):
    return {"table": True, "out": False, "out_bias": False}

  return _ngram_model(
    "wiki-hashed", data, len(_SALTS), init, logits, batch_size, steps, 128, tables
  )


_BUILDERS = {
  f.__name__.replace("_", "-"): f
  for f in (
    movielens, shakespeare_word, shakespeare_char, mnist, code_char,
    wiki_word, cmudict_syllables, digits_conv, speeches_bow, wiki_hashed,
  )
}  # fmt: skip


def build(name: str, **sizes) -> Workload:
  """The workload ``name``, ``sizes`` going to its builder; ``ValueError`` for an
  unknown name (``MissingDataError`` without its data)."""
  if name not in _BUILDERS:
    allowed = ", ".join(_BUILDERS)
    raise ValueError(f"unknown workload {name!r}; allowed: {allowed}")
  return _BUILDERS[name](**sizes)
