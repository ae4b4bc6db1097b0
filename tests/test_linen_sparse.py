"""optax_sm3.linen: SparseEmbed trained with the function-level helpers."""

import os

import _tiers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _lazy_rows import lazy_table

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


@pytest.mark.parametrize("padding_id", _tiers.fast_first([None, 3], [3]))
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
  table_tx = optax_sm3.sm3(**hyper)
  opt = sparse_linen.sparse_tables(tx, table_tx, tables=mask)
  labels = jax.tree.map(lambda m: "tables" if m else "rest", mask)
  ref_opt = optax.multi_transform({"tables": table_tx, "rest": tx}, labels)

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


@pytest.mark.parametrize("lazy", [False, True])
def test_attend_trains_exactly(lazy, monkeypatch):
  if lazy:  # A stored table that lags: attend must read the synced one.
    real = optax_sm3._sparse._rows.Table
    monkeypatch.setattr(optax_sm3._sparse._rows, "Table", lazy_table(real))

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
  ref = optax_sm3.sm3(**hyper)
  opt = sparse_linen.sparse_tables(
    optax.sgd(0.1), ref, tables=lambda p: jax.tree.map(lambda _: True, p)
  )

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


# ---------------------------------------------------------------------------
# SparseTrainState: Flax's TrainState idiom over sparse_tables.


class Tower(nn.Module):
  """A table looked up twice (ids and context) and tied to the output."""

  embed: type = sparse_linen.SparseEmbed

  @nn.compact
  def __call__(self, ids, context):
    items = self.embed(40, 4, name="items")
    hidden = nn.Dense(4, name="mix")(items(ids).mean(axis=1) * items(context))
    return items.attend(hidden)  # (batch, 40) logits over the same table


_HYPER = dict(learning_rate=0.1, momentum=0.5, beta=0.9, eps=1e-8, weight_decay=1e-3)
_IS_TABLE = lambda p: jax.tree.map_with_path(
  lambda path, _: "items" in jax.tree_util.keystr(path), p
)


def _tower_loss(apply_fn):
  def loss(params, ids, context, labels):
    logits = apply_fn({"params": params}, ids, context)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  return loss


def _tower_batches(steps, seed=0):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.integers(0, 30, (steps, 3, 4)), jnp.int32),
    jnp.asarray(rng.integers(0, 30, (steps, 3)), jnp.int32),
    jnp.asarray(rng.integers(0, 40, (steps, 3)), jnp.int32),
  )


def _sparse_state(model, batches, tx=None, **kwargs):
  params = model.init(jax.random.key(0), batches[0][0], batches[1][0])["params"]
  tx = tx or optax_sm3.sparse_tables(
    optax.adam(1e-2), optax_sm3.sm3(**_HYPER), tables=_IS_TABLE
  )
  return sparse_linen.SparseTrainState.create(
    apply_fn=model.apply, params=params, tx=tx, **kwargs
  )


@jax.jit
def _sparse_train_step(state, ids, context, labels):
  loss, grads = state.value_and_grad(_tower_loss(state.apply_fn))(ids, context, labels)
  return state.apply_gradients(grads=grads), loss


def _dense_state(batches, tx):
  from flax.training import train_state

  model = Tower(embed=nn.Embed)
  params = model.init(jax.random.key(0), batches[0][0], batches[1][0])["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


@jax.jit
def _dense_train_step(state, ids, context, labels):
  loss, grads = jax.value_and_grad(_tower_loss(state.apply_fn))(
    state.params, ids, context, labels
  )
  return state.apply_gradients(grads=grads), loss


def _dense_tx(inner=lambda tx: tx):
  labels = lambda p: jax.tree.map(lambda t: "tables" if t else "rest", _IS_TABLE(p))
  return inner(
    optax.multi_transform(
      {"tables": optax_sm3.sm3(**_HYPER), "rest": optax.adam(1e-2)}, labels
    )
  )


def _assert_close(a, b, rtol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.max(np.abs(x - y)) <= rtol * np.max(np.abs(y))


def test_train_state_matches_dense_sm3_with_tied_table():
  batches = _tower_batches(6)
  state = _sparse_state(Tower(), batches)
  # One table (looked up twice, read by attend): one state, one step.
  assert len(state.opt_state.tables) == 1
  dense = _dense_state(batches, _dense_tx())
  for batch in zip(*batches, strict=True):
    state, loss = _sparse_train_step(state, *batch)
    dense, dense_loss = _dense_train_step(dense, *batch)
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-5)
  assert int(state.step) == 6
  _assert_close(state.sync().params, dense.params)


def test_train_state_lookups_only_trains_sparse_rows():
  class Bag(nn.Module):
    @nn.compact
    def __call__(self, ids, context):
      items = sparse_linen.SparseEmbed(40, 4, name="items")
      return nn.Dense(40, name="head")(items(ids).mean(axis=1) * items(context))

  batches = _tower_batches(2)
  state = _sparse_state(Bag(), batches)
  _, grads = state.value_and_grad(_tower_loss(state.apply_fn))(*(b[0] for b in batches))
  table = grads["items"]["embedding"]
  assert isinstance(table, sparse_linen.SparseGrad)
  assert table.indices.shape == (3 * 4 + 3,)  # both lookups, concatenated


def test_train_state_orbax_round_trip_continues_identically():
  ocp = pytest.importorskip("orbax.checkpoint")
  import tempfile

  batches = _tower_batches(6, seed=1)
  state = _sparse_state(Tower(), batches)
  for batch in list(zip(*batches, strict=True))[:3]:
    state, _ = _sparse_train_step(state, *batch)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "state")
    with ocp.StandardCheckpointer() as c:
      c.save(path, state)
    with ocp.StandardCheckpointer() as c:
      restored = c.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  assert isinstance(restored, sparse_linen.SparseTrainState)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for batch in list(zip(*batches, strict=True))[3:]:
    state, loss = _sparse_train_step(state, *batch)
    restored, restored_loss = _sparse_train_step(restored, *batch)
    np.testing.assert_array_equal(loss, restored_loss)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(x, y)


def test_train_state_with_multi_steps_matches_optax_multisteps():
  every_k, calls = 3, 6
  batches = _tower_batches(calls, seed=2)
  tables = optax_sm3.sparse_tables(
    optax.adam(1e-2), optax_sm3.sm3(**_HYPER), tables=_IS_TABLE
  )
  multi = optax_sm3.sparse_multi_steps(tables, every_k)
  probe = _sparse_state(Tower(), batches, tx=tables)
  _, grads_like = jax.eval_shape(
    lambda s: s.value_and_grad(_tower_loss(s.apply_fn))(*(b[0] for b in batches)),
    probe,
  )
  state = _sparse_state(Tower(), batches, tx=multi, grads_like=grads_like)
  dense = _dense_state(
    batches,
    _dense_tx(lambda tx: optax.MultiSteps(tx, every_k).gradient_transformation()),
  )
  for batch in zip(*batches, strict=True):
    state, _ = _sparse_train_step(state, *batch)
    dense, _ = _dense_train_step(dense, *batch)
  assert int(state.opt_state.gradient_step) == calls // every_k
  _assert_close(state.sync().params, dense.params)


def test_sparse_tables_cannot_be_taken_for_an_optax_transformation():
  from flax.training import train_state

  batches = _tower_batches(1)
  model = Tower()
  params = model.init(jax.random.key(0), batches[0][0], batches[1][0])["params"]
  opt = optax_sm3.sparse_tables(
    optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0), tables=_IS_TABLE
  )
  # Flax's TrainState would add the new params to the old: it fails instead.
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=opt)
  grads = jax.grad(_tower_loss(model.apply))(params, *(b[0] for b in batches))
  with pytest.raises(TypeError, match="SparseTrainState"):
    state.apply_gradients(grads=grads)
  with pytest.raises(TypeError, match="not an optax GradientTransformation"):
    optax.chain(opt).update(grads, optax.chain(opt).init(params), params)
  with pytest.raises(TypeError, match="TrainState"):
    sparse_linen.SparseTrainState.create(
      apply_fn=model.apply, params=params, tx=optax.adam(1e-3)
    )
  multi = optax_sm3.sparse_multi_steps(opt, 2)
  with pytest.raises(TypeError, match="grads_like"):
    sparse_linen.SparseTrainState.create(apply_fn=model.apply, params=params, tx=multi)
