"""optax_sm3.nnx: SparseEmbed, the row-sparse grad helper and SparseOptimizer."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _lazy_rows import lazy_table
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

import optax_sm3

nnx = pytest.importorskip("flax.nnx")
sparse_nnx = pytest.importorskip("optax_sm3.nnx")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Model(nnx.Module):
  """Two towers over one table, an unused table, a dense head."""

  def __init__(self, rngs, embed=sparse_nnx.SparseEmbed, rows=40, features=4, **kw):
    self.items = embed(rows, features, rngs=rngs, **kw)
    self.unused = embed(7, features, rngs=rngs, **kw)
    self.head = nnx.Linear(features, 1, rngs=rngs)

  def __call__(self, ids, context):
    # The same table looked up twice (a bag and a context window).
    bag = self.items(ids).mean(axis=1)
    return self.head(bag * self.items(context))[:, 0]


class PaddedEmbed(nnx.Embed):
  """The dense reference of SparseEmbed(padding_id=...): nnx.Embed, masked."""

  def __init__(self, rows, features, *, rngs, padding_id):
    super().__init__(rows, features, rngs=rngs)
    self.padding_id = padding_id
    self.embedding[...] = self.embedding[...].at[padding_id].set(0)

  def __call__(self, ids):
    return jnp.where((ids == self.padding_id)[..., None], 0.0, super().__call__(ids))


def _loss(model, ids, context, y):
  return jnp.mean((model(ids, context) - y) ** 2)


def _batches(seed, steps, rows, batch=3, bag=4, touched=25):
  rng = np.random.default_rng(seed)
  # Ids from [0, touched): the rows above are never touched; small ranges
  # give many repeats within a batch.
  ids = rng.integers(0, touched, (steps, batch, bag)).astype(np.int32)
  context = rng.integers(0, touched, (steps, batch)).astype(np.int32)
  y = rng.normal(size=(steps, batch)).astype(np.float32)
  return ids, context, y


def _table_filter(path, _):
  return path[0] in ("items", "unused")


def _rest_filter(path, value):
  return isinstance(value, nnx.Param) and not _table_filter(path, value)


def _scan(step, objects, batches):
  """Runs ``step(objects, batch)`` over the batches in one jitted lax.scan."""
  graphdef, state = nnx.split(objects)

  @jax.jit
  def run(state, batches):
    def body(state, batch):
      objects = nnx.merge(graphdef, state)
      loss = step(objects, batch)
      return nnx.state(objects), loss

    return jax.lax.scan(body, state, batches)

  state, losses = run(state, batches)
  nnx.update(objects, state)
  return losses


def _dense_reference(model, tables_tx, tx, batches):
  """Dense gradients; tables_tx on the tables, tx on the rest (pure optax)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.as_pure(params)
  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: "tables" if path[0].key in ("items", "unused") else "rest", params
  )
  opt = optax.multi_transform({"tables": tables_tx, "rest": tx}, labels)

  def loss(params, batch):
    return _loss(nnx.merge(graphdef, params, rest), *batch)

  @jax.jit
  def run(params, batches):
    def body(carry, batch):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params, batch)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), value

    return jax.lax.scan(body, (params, opt.init(params)), batches)

  (params, _), losses = run(params, batches)
  nnx.update(model, params)
  return losses


def _train_pair(hyper, padding_id, seed, steps):
  """Trains the sparse path and the dense reference on the same batches."""
  kw = {} if padding_id is None else {"padding_id": padding_id}
  sparse = Model(nnx.Rngs(0), **kw)
  if padding_id is None:
    dense = Model(nnx.Rngs(0), embed=nnx.Embed)
  else:
    dense = Model(nnx.Rngs(0), embed=PaddedEmbed, padding_id=padding_id)
  tx = optax.adam(1e-2)
  tables_tx = optax_sm3.sm3(**hyper)
  optimizer = sparse_nnx.SparseOptimizer(sparse, tx, tables_tx)

  def sparse_step(objects, batch):
    model, optimizer = objects
    loss, grads = sparse_nnx.value_and_grad(_loss)(model, *batch)
    optimizer.update(model, grads)
    return loss

  ids, context, y = _batches(seed, steps, 40)
  if padding_id is not None:
    ids[:, 0, 0] = padding_id  # The padding id in every batch.
  a = _scan(sparse_step, (sparse, optimizer), (ids, context, y))
  b = _dense_reference(dense, tables_tx, tx, (ids, context, y))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  optimizer.sync(sparse)
  return sparse, dense, optimizer


def _assert_params_close(sparse, dense, rtol=1e-6):
  a = nnx.to_flat_state(nnx.state(sparse, nnx.Param))
  b = dict(nnx.to_flat_state(nnx.state(dense, nnx.Param)))
  assert len(a) == len(b)
  for path, value in a:
    x, y = np.asarray(value[...]), np.asarray(b[path][...])
    scale = max(np.max(np.abs(y)), 1e-30)
    assert np.max(np.abs(x - y)) <= rtol * scale, (path, np.max(np.abs(x - y)) / scale)


_HYPER = dict(learning_rate=0.1, momentum=0.0, beta=0.0, eps=1e-8, weight_decay=0.0)


# Each example compiles two 200-step scans (~3 s): one generated example by
# default, more with OPTAX_SM3_EXACT_EXAMPLES=n; no shrinking.
@settings(
  max_examples=int(os.environ.get("OPTAX_SM3_EXACT_EXAMPLES", "1")),
  deadline=None,
  phases=(Phase.explicit, Phase.generate),
)
@example(beta=0.9, momentum=0.8, weight_decay=1e-3, padding_id=3, seed=1)
@given(
  beta=st.sampled_from([0.0, 0.9]),
  momentum=st.sampled_from([0.0, 0.8]),
  weight_decay=st.sampled_from([0.0, 1e-3]),
  padding_id=st.sampled_from([None, 3]),
  seed=st.integers(0, 2**16),
)
def test_matches_dense_sm3_over_200_steps(
  beta, momentum, weight_decay, padding_id, seed
):
  hyper = dict(_HYPER, beta=beta, momentum=momentum, weight_decay=weight_decay)
  sparse, dense, _ = _train_pair(hyper, padding_id, seed, steps=200)
  _assert_params_close(sparse, dense)
  # Rows 25.. are never looked up; with no decay they never move.
  if weight_decay == 0.0:
    init = Model(nnx.Rngs(0)).items.embedding[...]
    np.testing.assert_array_equal(sparse.items.embedding[25:], init[25:])
  if padding_id is not None:
    np.testing.assert_array_equal(sparse.items.embedding[padding_id], 0.0)


@pytest.fixture
def lazy_rows(monkeypatch):
  monkeypatch.setattr(
    optax_sm3._sparse._rows, "Table", lazy_table(optax_sm3._sparse._rows.Table)
  )


def test_stale_tables_are_read_through_lookup_and_sync(lazy_rows):
  hyper = dict(_HYPER, beta=0.5)
  sparse, dense, _ = _train_pair(hyper, 3, seed=2, steps=20)
  _assert_params_close(sparse, dense, rtol=1e-5)


def test_attend_with_stale_tables(lazy_rows):
  _check_attend(rtol=1e-5)


def test_forward_equals_nnx_embed():
  for dtype in (None, jnp.bfloat16):
    ref = nnx.Embed(50, 6, dtype=dtype, rngs=nnx.Rngs(3))
    ours = sparse_nnx.SparseEmbed(50, 6, dtype=dtype, rngs=nnx.Rngs(3))
    ids = jnp.array([[0, 49, 7], [7, 7, 1]])
    np.testing.assert_array_equal(ours.embedding[...], ref.embedding[...])
    out = ours(ids)
    assert out.dtype == ref(ids).dtype
    np.testing.assert_array_equal(out, ref(ids))
    query = jnp.ones((2, 6))
    np.testing.assert_array_equal(ours.attend(query), ref.attend(query))


def test_padding_reads_zero_and_gets_no_gradient():
  embed = sparse_nnx.SparseEmbed(10, 3, padding_id=2, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(embed(jnp.array([2, 2])), 0.0)
  assert np.all(np.asarray(embed(jnp.array([1]))) != 0)
  _, grads = sparse_nnx.value_and_grad(lambda m: jnp.sum(m(jnp.array([2, 1, 2]))))(
    embed
  )
  indices, rows = grads["embedding"].get_value()
  np.testing.assert_array_equal(indices, [2, 1, 2])
  np.testing.assert_array_equal(rows, [[0, 0, 0], [1, 1, 1], [0, 0, 0]])


def test_grads_equal_nnx_grad_and_stay_sparse():
  # Without an optimizer attached the model trains densely under nnx.grad:
  # the reference gradient.
  model = Model(nnx.Rngs(0))
  ids, context, y = (jnp.asarray(a[0]) for a in _batches(0, 1, 40))
  ref = nnx.grad(_loss)(model, ids, context, y)
  value, grads = sparse_nnx.value_and_grad(_loss)(model, ids, context, y)
  np.testing.assert_allclose(value, _loss(model, ids, context, y), rtol=1e-6)
  for path, v in nnx.to_flat_state(ref):
    g = dict(nnx.to_flat_state(grads))[path].get_value()
    if path[0] == "head":
      np.testing.assert_array_equal(g, v[...])
    else:
      assert isinstance(g, sparse_nnx.SparseGrad)
      dense = jnp.zeros_like(v[...]).at[g.indices].add(g.row_grads)
      np.testing.assert_allclose(dense, v[...], rtol=1e-6, atol=1e-7)
  items = dict(nnx.to_flat_state(grads))[("items", "embedding")].get_value()
  # Both lookups, in call order, repeats kept.
  np.testing.assert_array_equal(items.indices, np.concatenate([ids.ravel(), context]))
  unused = dict(nnx.to_flat_state(grads))[("unused", "embedding")].get_value()
  assert unused.indices.shape == (0,)


def test_no_table_sized_array_in_the_gradient():
  class Big(nnx.Module):
    def __init__(self, rngs):
      self.items = sparse_nnx.SparseEmbed(9973, 7, rngs=rngs)
      self.head = nnx.Linear(7, 1, rngs=rngs)

    def __call__(self, ids):
      return self.head(self.items(ids).mean(axis=1))[:, 0]

  model = Big(nnx.Rngs(0))
  sparse_nnx.SparseOptimizer(model, optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0))
  graphdef, state = nnx.split(model)

  def grads_of(state, ids):
    m = nnx.merge(graphdef, state)
    return sparse_nnx.grad(lambda m: jnp.sum(m(ids)))(m)

  ids = jnp.array([[1, 5], [5, 9]])
  hlo = jax.jit(grads_of).lower(state, ids).compile().as_text()
  table_sized = re.compile(r"=\s*\w+\[9973,7\]")  # An instruction's result.
  made = [
    ln for ln in hlo.splitlines() if table_sized.search(ln) and "parameter(" not in ln
  ]
  assert not made, made
  # Dense nnx.grad does form it (the check can fail).
  dense_hlo = (
    jax.jit(lambda s, i: nnx.grad(lambda m: jnp.sum(m(i)))(nnx.merge(graphdef, s)))
    .lower(state, ids)
    .compile()
    .as_text()
  )
  assert any(
    table_sized.search(ln) and "parameter(" not in ln for ln in dense_hlo.splitlines()
  ), "the check is vacuous"


class Tied(nnx.Module):
  def __init__(self, rngs, embed=sparse_nnx.SparseEmbed):
    self.items = embed(30, 4, rngs=rngs)

  def __call__(self, ids):
    return self.items.attend(self.items(ids))


def test_attend_takes_the_exact_dense_step():
  _check_attend(rtol=1e-6, check_grads=True)


def _check_attend(rtol, check_grads=False):
  sparse, dense = Tied(nnx.Rngs(0)), Tied(nnx.Rngs(0), embed=nnx.Embed)
  hyper = dict(_HYPER, beta=0.5, momentum=0.5)
  optimizer = sparse_nnx.SparseOptimizer(sparse, optax.sgd(0.1), optax_sm3.sm3(**hyper))
  ref = nnx.Optimizer(dense, optax_sm3.sm3(0.1, 0.5, 0.5, 1e-8), wrt=nnx.Param)
  loss = lambda m, ids: jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(m(ids), ids)
  )
  if check_grads:
    ids = jnp.array([0, 3, 3, 29])
    _, grads = sparse_nnx.value_and_grad(loss)(sparse, ids)
    assert not isinstance(
      grads["items"]["embedding"].get_value(), sparse_nnx.SparseGrad
    )

  @nnx.jit
  def steps(sparse, optimizer, dense, ref):
    for t in range(2):
      ids = jnp.array([t, 3, 3, 29])
      optimizer.update(sparse, sparse_nnx.grad(loss)(sparse, ids))
      ref.update(dense, nnx.grad(loss)(dense, ids))

  steps(sparse, optimizer, dense, ref)
  optimizer.sync(sparse)
  _assert_params_close(sparse, dense, rtol)


def test_dense_read_of_the_table_is_not_dropped():
  model = Model(nnx.Rngs(0))
  ids, context, y = (jnp.asarray(a[0]) for a in _batches(0, 1, 40))

  def loss(m):
    return _loss(m, ids, context, y) + 1e-2 * jnp.sum(m.items.embedding[...] ** 2)

  _, grads = sparse_nnx.value_and_grad(loss)(model)
  ref = nnx.grad(loss)(model)
  np.testing.assert_allclose(
    grads["items"]["embedding"][...], ref["items"]["embedding"][...], rtol=1e-6
  )


def test_has_aux_argnums_and_grad():
  model = Model(nnx.Rngs(0))
  ids, context, y = (jnp.asarray(a[0]) for a in _batches(0, 1, 40))
  scale = jnp.asarray(2.0)

  def loss(scale, model):
    value = scale * _loss(model, ids, context, y)
    return value, value + 1

  (value, aux), (g_scale, g_model) = sparse_nnx.value_and_grad(
    loss, argnums=(0, 1), has_aux=True
  )(scale, model)
  np.testing.assert_allclose(aux, value + 1)
  np.testing.assert_allclose(g_scale, value / 2, rtol=1e-6)
  grads, aux2 = sparse_nnx.grad(loss, argnums=1, has_aux=True)(scale, model)
  np.testing.assert_array_equal(aux2, aux)
  np.testing.assert_array_equal(
    grads["head"]["kernel"][...], g_model["head"]["kernel"][...]
  )
  with pytest.raises(TypeError, match="argnums"):
    sparse_nnx.grad(loss, argnums="0")(scale, model)


def test_optimizer_state_round_trips_and_donation():
  ocp = pytest.importorskip("orbax.checkpoint")
  import tempfile

  hyper = dict(_HYPER, momentum=0.5, beta=0.5)
  ids, context, y = _batches(0, 6, 40)

  def fresh():
    model = Model(nnx.Rngs(0))
    tables_tx = optax_sm3.sm3(**hyper)
    return model, sparse_nnx.SparseOptimizer(model, optax.adam(1e-2), tables_tx)

  @nnx.jit(donate_argnums=(0, 1))
  def step(model, optimizer, ids, context, y):
    _, grads = sparse_nnx.value_and_grad(_loss)(model, ids, context, y)
    optimizer.update(model, grads)

  model, optimizer = fresh()
  for t in range(3):
    step(model, optimizer, ids[t], context[t], y[t])
  with tempfile.TemporaryDirectory() as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(f"{tmp}/m", nnx.state(model))
    checkpointer.save(f"{tmp}/o", nnx.state(optimizer))
    checkpointer.wait_until_finished()
    model2, optimizer2 = fresh()
    nnx.update(model2, checkpointer.restore(f"{tmp}/m", nnx.state(model2)))
    nnx.update(optimizer2, checkpointer.restore(f"{tmp}/o", nnx.state(optimizer2)))
  assert int(optimizer2.step[...]) == 3
  for t in range(3, 6):
    step(model, optimizer, ids[t], context[t], y[t])
    step(model2, optimizer2, ids[t], context[t], y[t])
  for a, b in zip(
    jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(model2)), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(
    jax.tree.leaves(nnx.state(optimizer)),
    jax.tree.leaves(nnx.state(optimizer2)),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)


def test_train_step_writes_last_in_place():
  # With the lookup (forward) and the step in one jit, XLA updates the
  # lazy state's `last` in place only if its write waits for the forward's
  # reads; otherwise it copies `last` (4 bytes a row) whole, twice. The
  # step's temporaries stay batch-sized (48 KiB here; 301 KiB with the copy).
  rows = 2**16

  class Bags(nnx.Module):
    def __init__(self, rngs):
      self.items = sparse_nnx.SparseEmbed(rows, 4, rngs=rngs)
      self.head = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, ids):
      return self.head(self.items(ids).mean(axis=1))[:, 0]

  model = Bags(nnx.Rngs(0))
  tables_tx = optax_sm3.sm3(0.1, momentum=0.9)  # lazy rows: `last` is kept
  optimizer = sparse_nnx.SparseOptimizer(model, optax.adam(1e-2), tables_tx)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, ids, y):
    model, optimizer = nnx.merge(graphdef, state)
    loss_fn = lambda m: jnp.mean((m(ids) - y) ** 2)
    loss, grads = sparse_nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  ids, y = jnp.zeros((64, 4), jnp.int32), jnp.zeros((64,))
  compiled = jax.jit(step, donate_argnums=0).lower(state, ids, y).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < rows * 4 // 2


def test_bad_input():
  embed = sparse_nnx.SparseEmbed(10, 3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="inputs"):
    embed(jnp.array([1.0]))
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    embed(jnp.array([10]))
  with pytest.raises(ValueError, match="padding_id"):
    sparse_nnx.SparseEmbed(10, 3, padding_id=10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="features"):
    sparse_nnx.SparseEmbed(10, 0, rngs=nnx.Rngs(0))

  model = Model(nnx.Rngs(0))
  optimizer = sparse_nnx.SparseOptimizer(
    model, optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0)
  )
  ids, context, y = (jnp.asarray(a[0]) for a in _batches(0, 1, 40))
  other = Tied(nnx.Rngs(0))
  _, wrong = sparse_nnx.value_and_grad(lambda m: jnp.sum(m(ids)))(other)
  with pytest.raises(ValueError, match="grads"):
    optimizer.update(model, wrong)
  # A table replaced by one of another shape.
  _, grads = sparse_nnx.value_and_grad(_loss)(model, ids, context, y)
  model.items.embedding = nnx.Param(jnp.zeros((41, 4)))
  with pytest.raises(ValueError, match=r"shape \(41, 4\)"):
    optimizer.update(model, grads)


@pytest.mark.skipif(
  os.environ.get("OPTAX_SM3_EXAMPLES") != "1",
  reason="runs examples/nnx_sparse_embedding.py --quick (~25 s); set OPTAX_SM3_EXAMPLES=1",
)
def test_example_quick():
  pytest.importorskip("benchmarks._data").package_dir("recbole")
  out = subprocess.run(
    [sys.executable, "-m", "examples.nnx_sparse_embedding", "--quick"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
    check=True,
  ).stdout
  rel = float(re.search(r"max relative \|sparse - dense\| = (\S+)", out).group(1))
  speed_up = float(re.search(r"step speed-up = (\S+)x", out).group(1))
  assert rel <= 1e-5 and speed_up > 1.0, out


def test_shared_module_and_nnx_jit():
  class Shared(nnx.Module):
    def __init__(self, rngs):
      self.users = sparse_nnx.SparseEmbed(20, 3, rngs=rngs)
      self.items = self.users  # One table, two names.

    def __call__(self, u, i):
      return jnp.sum(self.users(u) * self.items(i), axis=-1)

  model = Shared(nnx.Rngs(0))
  u, i = jnp.array([1, 2, 2]), jnp.array([2, 5, 1])
  loss = lambda m: jnp.sum(m(u, i) ** 2)
  ref = nnx.grad(loss)(model)
  grads = nnx.jit(sparse_nnx.grad(loss))(model)
  (path,) = [p for p, _ in nnx.to_flat_state(grads)]
  g = dict(nnx.to_flat_state(grads))[path].get_value()
  np.testing.assert_array_equal(g.indices, [1, 2, 2, 2, 5, 1])
  dense = jnp.zeros((20, 3)).at[g.indices].add(g.row_grads)
  np.testing.assert_allclose(dense, ref[path[0]]["embedding"][...], rtol=1e-6)
