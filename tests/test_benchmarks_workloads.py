"""The transfer study's workloads and their data (benchmarks/_workloads.py, _data.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import _data, _workloads

_TINY = {
  "code-char": {"dim": 8, "layers": 1, "heads": 2, "length": 8, "steps": 4},
  "wiki-word": {
    "dim": 8, "layers": 1, "heads": 2, "length": 8, "vocab_size": 64, "steps": 4
  },
  "cmudict-syllables": {"dim": 8, "layers": 1, "heads": 2, "steps": 4},
}  # fmt: skip


# One workload by default (the tied one); the others (the same transformer on
# other data) with --slow.
@pytest.mark.parametrize(
  "name",
  [
    n if n == "wiki-word" else pytest.param(n, marks=pytest.mark.slow)
    for n in _workloads.TRANSFER_NAMES
  ],
)
def test_transfer_workload_trains_and_scores(name):
  workload = _workloads.build(name, **_TINY[name])
  params = workload.init(jax.random.key(0))
  train = dict(workload.train, pool=len(workload.train[next(iter(workload.train))]))
  batch = workload.sample(jax.random.key(1), train)
  loss, grads = jax.value_and_grad(workload.loss)(params, batch)
  assert np.isfinite(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  metric = float(workload.evaluate(params, workload.valid))
  if workload.higher_is_better:
    assert 0.0 <= metric <= 1.0
  else:  # an untrained LM is near the uniform guess
    vocab = params["embedding"].shape[0]
    assert metric == pytest.approx(np.log(vocab), rel=0.2)
  assert workload.num_valid > 0


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
  data = _data.load_code(window=16)
  assert data["train"].shape[1] == 17 and data["vocab_size"] <= 100


@pytest.mark.parametrize(
  ("loader", "kwargs", "match"),
  [
    (_data.load_code, {"window": 0}, "`window` must be >= 1"),
    (_data.load_wikipedia, {"vocab_size": 1}, "`vocab_size` must be >= 2"),
    (_data.load_cmudict, {"max_length": 0}, "`max_length` must be >= 1"),
    (_data.load_cmudict, {"test_fraction": 1.0}, "`test_fraction` must be in"),
  ],
)
def test_loaders_name_bad_arguments(loader, kwargs, match):
  with pytest.raises(ValueError, match=match):
    loader(**kwargs)
