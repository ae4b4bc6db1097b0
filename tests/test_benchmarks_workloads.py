"""The transfer study's workloads and their data (benchmarks/_workloads.py, _data.py)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3
from benchmarks import _data, _optimizers, _runner, _workloads

_TINY = {
  "code-char": {"dim": 8, "layers": 1, "heads": 2, "length": 8, "steps": 4},
  "wiki-word": {
    "dim": 8, "layers": 1, "heads": 2, "length": 8, "vocab_size": 64, "steps": 4
  },
  "cmudict-syllables": {"dim": 8, "layers": 1, "heads": 2, "steps": 4},
  "digits-conv": {"channels": 4, "steps": 4},
  "speeches-bow": {"dim": 8, "buckets": 2**8, "steps": 4},
  "wiki-hashed": {"rows": 2**8, "dim": 4, "vocab_size": 64, "steps": 4},
}  # fmt: skip


# Slow: workload trainings (the main job's tiny run trains movielens by default;
# the hashed model trains in its sparse-path test below).
@pytest.mark.slow
@pytest.mark.parametrize("name", _workloads.TRANSFER_NAMES)
def test_transfer_workload_trains_and_scores(name):
  workload = _workloads.build(name, **_TINY[name])
  params = workload.init(jax.random.key(0))
  train = dict(workload.train, pool=len(workload.train[next(iter(workload.train))]))
  batch = workload.sample(jax.random.key(1), train)
  loss, grads = jax.jit(jax.value_and_grad(workload.loss))(params, batch)
  assert np.isfinite(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  metric = float(jax.jit(workload.evaluate)(params, workload.valid))
  if workload.higher_is_better:
    assert 0.0 <= metric <= 1.0
  else:  # an untrained LM is near the uniform guess
    vocab = params["out"].shape[1] if "out" in params else params["embedding"].shape[0]
    assert metric == pytest.approx(np.log(vocab), rel=0.2)
  assert workload.num_valid > 0


@pytest.mark.slow  # a benchmark workload's training
def test_wiki_word_ties_its_embeddings():
  workload = _workloads.build("wiki-word", **_TINY["wiki-word"])
  params = workload.init(jax.random.key(0))
  assert "unembedding" not in params
  batch = workload.sample(jax.random.key(1), dict(workload.train, pool=8))
  grads = jax.grad(workload.loss)(params, batch)
  # The output layer's gradient reaches every row, not only the looked-up ones.
  looked_up = np.unique(np.asarray(batch[:, :-1]))
  rows = np.abs(np.asarray(grads["embedding"])).sum(axis=1) > 0
  assert rows.sum() > len(looked_up)


def test_cmudict_counts_syllables():
  data = _data.load_cmudict()
  alphabet = "_abcdefghijklmnopqrstuvwxyz'"
  words = {
    "".join(alphabet[i] for i in row if i): label
    for row, label in zip(data["train_words"], data["train_labels"], strict=True)
  }
  for word, syllables in {"banana": 3, "cat": 1, "dictionary": 4}.items():
    if word in words:
      assert words[word] == syllables
  assert sum(w in words for w in ("banana", "cat", "dictionary")) >= 2
  assert data["train_words"].shape[1] == 16 and data["alphabet_size"] == 28
  assert set(np.unique(data["test_labels"])) <= set(range(10))


def test_corpora_are_real_text():
  code = _data.code_text()
  assert "def " in code and "class Basic" in code
  wiki = _data.wikipedia_text()
  assert "Anarchism" in wiki and "<ref" not in wiki and wiki.count("[[") < 5
  assert wiki.count("{{") < 20  # a few templates that quote braces stay
  data = _data.load_text("code", "char", vocab_size=100, window=16)
  assert data["train"].shape[1] == 17 and data["vocab_size"] <= 100


@pytest.mark.parametrize(
  ("loader", "kwargs", "match"),
  [
    (_data.load_text, {"corpus": "code", "window": 0}, "`window` must be >= 1"),
    (
      _data.load_text,
      {"corpus": "wikipedia", "vocab_size": 1},
      "`vocab_size` must be >= 2",
    ),
    (_data.load_text, {"corpus": "poems"}, "`corpus` must be one of"),
    (_data.load_cmudict, {"max_length": 0}, "`max_length` must be >= 1"),
    (_data.load_cmudict, {"test_fraction": 1.0}, "`test_fraction` must be in"),
    (_data.load_speeches, {"buckets": 1}, "`buckets` must be >= 2"),
    (_data.load_digits, {"test_fraction": 0.0}, "`test_fraction` must be in"),
  ],
)
def test_loaders_name_bad_arguments(loader, kwargs, match):
  with pytest.raises(ValueError, match=match):
    loader(**kwargs)


@pytest.mark.slow  # a benchmark workload's training
def test_wiki_hashed_trains_its_table_through_the_sparse_path():
  """The sparse path (optax_sm3.sparse_tables in _runner.Trainer) equals the dense one."""
  assert inspect.signature(_workloads.wiki_hashed).parameters["rows"].default >= 2**18
  workload = _workloads.build("wiki-hashed", **_TINY["wiki-hashed"])
  recipe = _optimizers.Optimizer("recipe", optax_sm3.sm3_recipe, ())
  out = {}
  for sparse in (True, False):
    trainer = _runner.Trainer(workload, recipe, 10, sparse=sparse)
    out[trainer.path] = trainer.run(1e-2, 0, "tune")
  assert set(out) == {"sparse", "dense"}
  assert out["sparse"]["metric"] == pytest.approx(out["dense"]["metric"], rel=1e-5)
  np.testing.assert_allclose(out["sparse"]["losses"], out["dense"]["losses"], rtol=1e-5)
  # The table's rows are hashed contexts: different contexts, different rows.
  ids = _workloads._hash_contexts(jnp.asarray([[1, 2, 3], [1, 2, 4], [9, 2, 3]]), 2**18)
  assert ids.shape == (3, 3) and len(np.unique(np.asarray(ids))) >= 7


def test_digits_are_scikit_learns():
  data = _data.load_digits()
  assert data["train_images"].shape[1:] == (8, 8)
  assert len(data["train_labels"]) + len(data["test_labels"]) == 1797
  assert 0.0 <= data["train_images"].min() and data["train_images"].max() == 1.0
  assert set(np.unique(data["test_labels"])) == set(range(10))


def test_speeches_are_labelled_with_their_play():
  speeches, labels, plays = _data.shakespeare_speeches()
  assert len(plays) == 38 and len(speeches) > 20_000
  (hamlet,) = [
    plays[label]
    for words, label in zip(speeches, labels, strict=True)
    if words[:6] == ["to", "be", "or", "not", "to", "be"]
  ]
  assert hamlet == "hamlet"
  assert all(len(words) >= 8 for words in speeches)
  ids = _data.hashed_ngrams(["to", "be", "or"], 2**8, 8)
  # 3 unigrams, 2 bigrams, then padding (the bucket count).
  assert list(ids[5:]) == [2**8] * 3 and (ids[:5] < 2**8).all()
  assert list(ids) == list(_data.hashed_ngrams(["to", "be", "or"], 2**8, 8))


def test_state_on_the_benchmark_transformer_is_two_percent_of_adams():
  # sm3_recipe's docstring: "about 2% of Adam's on a small transformer".
  workload = _workloads.build("shakespeare-char")
  params = jax.eval_shape(workload.init, jax.random.key(0))
  recipe = _runner.tree_bytes(
    jax.eval_shape(optax_sm3.sm3_recipe(1e-3, 400).init, params)
  )
  adam = _runner.tree_bytes(jax.eval_shape(optax.adam(1e-3).init, params))
  assert 0.015 < recipe / adam < 0.025
