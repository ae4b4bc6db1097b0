"""optax_sm3.linen: SparseEmbed trained with the function-level helpers."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _lazy_rows import lazy_sparse_rows

import optax_sm3

nn = pytest.importorskip("flax.linen")
sparse_linen = pytest.importorskip("optax_sm3.linen")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Model(nn.Module):
  embed: type = sparse_linen.SparseEmbed
  padding_id: int | None = None

  @nn.compact
  def __call__(self, ids, context):
    kw = {} if self.padding_id is None else {"padding_id": self.padding_id}
    items = self.embed(40, 4, name="items", **kw)
    bag = items(ids).mean(axis=1)
    return nn.Dense(1, name="head")(bag * items(context))[:, 0]


class PaddedEmbed(nn.Embed):
  padding_id: int = 0

  def setup(self):
    init = self.embedding_init
    self.embedding = self.param(
      "embedding",
      lambda k, s, d: init(k, s, d).at[self.padding_id].set(0),
      (self.num_embeddings, self.features),
      self.param_dtype,
    )

  def __call__(self, ids):
    return jnp.where((ids == self.padding_id)[..., None], 0.0, super().__call__(ids))


def test_forward_and_attend_equal_nn_embed():
  ids = jnp.array([[0, 39, 7], [7, 7, 1]])
  key = jax.random.key(3)
  ref = nn.Embed(40, 6, dtype=jnp.bfloat16)
  ours = sparse_linen.SparseEmbed(40, 6, dtype=jnp.bfloat16)
  v_ref, v_ours = ref.init(key, ids), ours.init(key, ids)
  np.testing.assert_array_equal(
    v_ours["params"]["embedding"], v_ref["params"]["embedding"]
  )
  out = ours.apply(v_ours, ids)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, ref.apply(v_ref, ids))
  q = jnp.ones((2, 6))
  np.testing.assert_array_equal(
    ours.apply(v_ours, q, method="attend"), ref.apply(v_ref, q, method="attend")
  )
  with pytest.raises(TypeError, match="inputs"):
    ours.apply(v_ours, jnp.array([1.0]))
  with pytest.raises(ValueError, match=r"\[0, 40\)"):
    ours.apply(v_ours, jnp.array([40]))


@pytest.mark.parametrize("padding_id", [None, 3])
def test_matches_dense_sm3(padding_id):
  sparse = Model(padding_id=padding_id)
  dense = (
    Model(embed=nn.Embed)
    if padding_id is None
    else Model(embed=lambda *a, **kw: PaddedEmbed(*a, **kw), padding_id=padding_id)
  )
  rng = np.random.default_rng(0)
  steps = 100
  ids = rng.integers(0, 25, (steps, 3, 4)).astype(np.int32)
  if padding_id is not None:
    ids[:, 0, 0] = padding_id
  batches = (
    ids,
    rng.integers(0, 25, (steps, 3)).astype(np.int32),
    rng.normal(size=(steps, 3)).astype(np.float32),
  )
  params = sparse.init(jax.random.key(0), ids[0], batches[1][0])["params"]
  ref_params = dense.init(jax.random.key(0), ids[0], batches[1][0])["params"]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
    np.testing.assert_array_equal(a, b)

  def loss(model):
    return lambda p, i, c, y: jnp.mean((model.apply({"params": p}, i, c) - y) ** 2)

  hyper = dict(learning_rate=0.1, momentum=0.5, beta=0.9, eps=1e-8, weight_decay=1e-3)
  tx = optax.adam(1e-2)
  mask = {"items": {"embedding": True}, "head": {"kernel": False, "bias": False}}
  opt = sparse_linen.sparse_tables(tx, **hyper, tables=mask)
  labels = jax.tree.map(lambda m: "tables" if m else "rest", mask)
  ref_opt = optax.multi_transform(
    {"tables": optax_sm3.sm3(**hyper), "rest": tx}, labels
  )

  @jax.jit
  def run(params):
    def sparse_body(carry, batch):
      params, state = carry
      _, grads = opt.value_and_grad(loss(sparse))(params, state, *batch)
      assert isinstance(grads["items"]["embedding"], sparse_linen.SparseGrad)
      return opt.step(params, grads, state), None

    def dense_body(carry, batch):
      params, state = carry
      grads = jax.grad(loss(dense))(params, *batch)
      updates, state = ref_opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (a, state), _ = jax.lax.scan(sparse_body, (params, opt.init(params)), batches)
    (b, _), _ = jax.lax.scan(dense_body, (params, ref_opt.init(params)), batches)
    return opt.sync(a, state)[0], b

  a, b = run(params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.max(np.abs(x - y)) <= 1e-6 * np.max(np.abs(y))
  if padding_id is not None:
    np.testing.assert_array_equal(a["items"]["embedding"][padding_id], 0.0)


def test_attend_gives_a_dense_gradient():
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
      items = sparse_linen.SparseEmbed(30, 4, name="items")
      return items.attend(items(ids))

  model, ids = Tied(), jnp.array([1, 3, 3])
  params = model.init(jax.random.key(0), ids)["params"]
  loss = lambda p: jnp.sum(jax.nn.log_softmax(model.apply({"params": p}, ids)))
  _, grads = sparse_linen.value_and_grad(loss)(params)
  np.testing.assert_allclose(
    grads["items"]["embedding"], jax.grad(loss)(params)["items"]["embedding"], rtol=1e-6
  )


def test_import_names_the_extra():
  code = (
    "import sys; sys.modules['flax'] = None\n"
    "try:\n  import optax_sm3.linen\nexcept ImportError as e:\n  print(e)\n"
  )
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env
  )
  assert "pip install 'optax-sm3[flax]'" in out.stdout, out.stderr


@pytest.mark.parametrize("lazy", [False, True])
def test_attend_trains_exactly(lazy, monkeypatch):
  if lazy:  # A stored table that lags: attend must read the synced one.
    real = optax_sm3._sparse.sparse_rows
    monkeypatch.setattr(optax_sm3._sparse, "sparse_rows", lazy_sparse_rows(real))

  class Tied(nn.Module):
    embed: type = sparse_linen.SparseEmbed

    @nn.compact
    def __call__(self, ids):
      items = self.embed(30, 4, name="items")
      return items.attend(items(ids))

  sparse, dense, ids = Tied(), Tied(embed=nn.Embed), jnp.array([[1, 3, 3], [0, 29, 3]])
  params = sparse.init(jax.random.key(0), ids[0])["params"]

  def loss(model):
    return lambda p, i: jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, i), i)
    )

  hyper = dict(learning_rate=0.1, momentum=0.5, beta=0.5, eps=1e-8)
  opt = sparse_linen.sparse_tables(
    optax.sgd(0.1), **hyper, tables=lambda p: jax.tree.map(lambda _: True, p)
  )
  ref = optax_sm3.sm3(**hyper)

  @jax.jit
  def run(params):
    a, state = params, opt.init(params)
    b, ref_state = params, ref.init(params)
    for i in ids:
      _, grads = opt.value_and_grad(loss(sparse))(a, state, i)
      a, state = opt.step(a, grads, state)
      updates, ref_state = ref.update(jax.grad(loss(dense))(b, i), ref_state, b)
      b = optax.apply_updates(b, updates)
    return opt.sync(a, state)[0], b

  a, b = run(params)
  x, y = a["items"]["embedding"], b["items"]["embedding"]
  assert np.max(np.abs(x - y)) <= 1e-5 * np.max(np.abs(y))
