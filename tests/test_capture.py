"""Sparse lookups under the JAX and Flax transforms a user wraps around them.

Each route (plain JAX ``sparse_value_and_grad``, linen, NNX) is checked
against the dense gradient (``jax.grad`` / ``nnx.grad``) and, for training,
against dense ``optax_sm3.sm3``; every check also asserts that the table's
gradient *is* a ``SparseGrad`` (no silent dense fallback).
"""

from __future__ import annotations

import _tiers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_sm3
from optax_sm3 import SparseGrad, sparse_lookup, sparse_value_and_grad

V, D = 23, 3


def _densify(grad: SparseGrad, rows: int = V) -> jax.Array:
  return (
    jnp.zeros((rows, *grad.row_grads.shape[1:]), grad.row_grads.dtype)
    .at[grad.indices]
    .add(grad.row_grads, mode="drop")
  )


def _params(seed=0):
  key_t, key_w = jax.random.split(jax.random.key(seed))
  return {"t": jax.random.normal(key_t, (V, D)), "w": jax.random.normal(key_w, (D,))}


def _row_loss(t, w, ids):
  return jnp.sum(jnp.tanh(sparse_lookup(t, ids) @ w) ** 2)


def _dense_row_loss(t, w, ids):
  return jnp.sum(jnp.tanh(t[ids] @ w) ** 2)


@jax.jit
def _jitted_row_loss(t, w, ids):
  return _row_loss(t, w, ids)


# Each: (loss via sparse_lookup, the same loss via t[ids], ids).
def _wrap(kind):
  ids = jnp.array([[1, 2, 3], [3, 4, 22]])
  if kind == "plain":
    return (lambda p, i: _row_loss(p["t"], p["w"], i)), ids
  if kind == "vmap":
    return (
      lambda p, i: jnp.sum(jax.vmap(lambda r: _row_loss(p["t"], p["w"], r))(i))
    ), ids
  if kind == "vmap_in_axes_1":
    f = jax.vmap(_row_loss, in_axes=(None, None, 1))
    return (lambda p, i: jnp.sum(f(p["t"], p["w"], i))), ids
  if kind == "vmap_vmap":
    inner = jax.vmap(jax.vmap(_row_loss, (None, None, 0)), (None, None, 0))
    return (lambda p, i: jnp.sum(inner(p["t"], p["w"], i[..., None]))), ids
  if kind == "vmap_of_jit":
    f = jax.vmap(_jitted_row_loss, in_axes=(None, None, 0))
    return (lambda p, i: jnp.sum(f(p["t"], p["w"], i))), ids
  if kind == "jit":
    return (lambda p, i: _jitted_row_loss(p["t"], p["w"], i)), ids
  if kind == "checkpoint":
    f = jax.checkpoint(_row_loss)
    return (lambda p, i: f(p["t"], p["w"], i)), ids
  if kind == "checkpoint_of_vmap":
    f = jax.checkpoint(jax.vmap(_row_loss, in_axes=(None, None, 0)))
    return (lambda p, i: jnp.sum(f(p["t"], p["w"], i))), ids
  if kind == "cond":

    def loss(p, i):
      return jax.lax.cond(
        jnp.sum(i) > 0,
        lambda: _row_loss(p["t"], p["w"], i),
        lambda: 2.0 * _row_loss(p["t"], p["w"], i[::-1]),
      )

    return loss, ids
  if kind == "two_lookups":
    return (
      lambda p, i: (
        _row_loss(p["t"], p["w"], i) + _row_loss(p["t"], 2 * p["w"], i[:, :1])
      )
    ), ids
  raise AssertionError(kind)


KINDS = [
  "plain",
  "vmap",
  "vmap_in_axes_1",
  "vmap_vmap",
  "vmap_of_jit",
  "jit",
  "checkpoint",
  "checkpoint_of_vmap",
  "cond",
  "two_lookups",
]


def _as_dense_loss(loss):
  """The same loss with every sparse_lookup read as ``t[ids]``."""

  def dense(p, i):
    with optax_sm3._sparse._capture.plain_reads():
      return loss(p, i)

  return dense


@pytest.mark.parametrize("outer_jit", _tiers.fast_first([False, True], [True]))
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_equals_jax_grad_and_is_sparse(kind, outer_jit):
  loss, ids = _wrap(kind)
  params = _params()
  fn = sparse_value_and_grad(loss)
  if outer_jit:
    fn = jax.jit(fn)
  value, grads = fn(params, ids)
  want_value, want = jax.value_and_grad(_as_dense_loss(loss))(params, ids)
  assert isinstance(grads["t"], SparseGrad), type(grads["t"])
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  np.testing.assert_allclose(_densify(grads["t"]), want["t"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads["w"], want["w"], rtol=1e-5, atol=1e-6)


def test_a_nested_jit_is_traced_again_each_call():
  # jax.jit caches the trace of _jitted_row_loss; a cached trace holds no
  # perturbation, so reusing it would give a zero gradient.
  params = _params()
  ids = jnp.array([2, 5, 5])
  fn = sparse_value_and_grad(lambda p, i: _jitted_row_loss(p["t"], p["w"], i))
  _jitted_row_loss(params["t"], params["w"], ids)  # Cached outside any helper.
  want = jax.grad(lambda p: _dense_row_loss(p["t"], p["w"], ids))(params)["t"]
  for _ in range(2):
    _, grads = fn(params, ids)
    np.testing.assert_allclose(_densify(grads["t"]), want, rtol=1e-5, atol=1e-6)


def _loop_losses():
  def scan(p, i):
    return jax.lax.scan(lambda c, r: (c + _row_loss(p["t"], p["w"], r), None), 0.0, i)[
      0
    ]

  def fori_static(p, i):
    body = lambda k, c: c + _row_loss(p["t"], p["w"], i[k])
    return jax.lax.fori_loop(0, i.shape[0], body, 0.0)

  def fori_dynamic(p, i):
    body = lambda k, c: c + _row_loss(p["t"], p["w"], i[k])
    return jax.lax.fori_loop(0, jnp.sum(i * 0) + i.shape[0], body, 0.0)

  def lax_map(p, i):
    return jnp.sum(jax.lax.map(lambda r: _row_loss(p["t"], p["w"], r), i))

  return {
    "scan": (scan, "lax.scan"),
    "fori_static": (fori_static, "scan"),
    "fori_dynamic": (fori_dynamic, "while_loop"),
    "lax_map": (lax_map, "lax.scan"),
  }


@pytest.mark.parametrize("name", sorted(_loop_losses()))
@pytest.mark.parametrize("outer_jit", [False, True])
def test_a_lookup_in_a_loop_is_a_clear_error_at_trace_time(name, outer_jit):
  loss, words = _loop_losses()[name]
  fn = sparse_value_and_grad(loss)
  if outer_jit:
    fn = jax.jit(fn)
  with pytest.raises(ValueError, match=f"(?s){words}.*before the loop"):
    fn(_params(), jnp.array([[1, 2], [3, 4]]))


def test_rows_looked_up_before_a_scan_are_sparse_and_exact():
  def loss(p, i):
    rows = sparse_lookup(p["t"], i)  # (T, B, D), then scan over time.
    step = lambda h, r: (jnp.tanh(h + r @ jnp.outer(p["w"], p["w"])), None)
    return jnp.sum(jax.lax.scan(step, jnp.zeros((2, D)), rows)[0] ** 2)

  params, ids = _params(), jnp.array([[1, 2], [2, 9], [9, 9]])
  _, grads = jax.jit(sparse_value_and_grad(loss))(params, ids)
  want = jax.grad(_as_dense_loss(loss))(params, ids)
  assert isinstance(grads["t"], SparseGrad)
  np.testing.assert_allclose(_densify(grads["t"]), want["t"], rtol=1e-5, atol=1e-6)


def test_a_table_batched_by_vmap_gets_its_dense_gradient():
  tables = jnp.stack([_params(0)["t"], _params(1)["t"]])  # An ensemble of two.
  params = {"t": tables, "w": _params()["w"]}
  ids = jnp.array([[1, 2], [2, 3]])

  def loss(p, i):
    return jnp.sum(jax.vmap(lambda t, r: _row_loss(t, p["w"], r))(p["t"], i))

  _, grads = sparse_value_and_grad(loss)(params, ids)
  want = jax.grad(_as_dense_loss(loss))(params, ids)
  np.testing.assert_allclose(grads["t"], want["t"], rtol=1e-5, atol=1e-6)


def test_tied_table_read_densely_gets_the_dense_gradient():
  def loss(p, i):  # An input lookup and an output projection on one table.
    return _row_loss(p["t"], p["w"], i) + jnp.sum(jax.nn.logsumexp(p["t"] @ p["w"]))

  params, ids = _params(), jnp.array([1, 4, 4])
  _, grads = jax.jit(sparse_value_and_grad(loss))(params, ids)
  want = jax.grad(_as_dense_loss(loss))(params, ids)
  assert not isinstance(grads["t"], SparseGrad)
  np.testing.assert_allclose(grads["t"], want["t"], rtol=1e-5, atol=1e-6)


def test_numpy_parameters_are_accepted_as_by_jax_value_and_grad():
  params = jax.tree.map(np.asarray, _params())
  ids = np.array([3, 3, 7])
  loss = lambda p, i: _row_loss(p["t"], p["w"], i)
  value, grads = sparse_value_and_grad(loss)(params, ids)
  want_value, want = jax.value_and_grad(_as_dense_loss(loss))(params, ids)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  np.testing.assert_allclose(_densify(grads["t"]), want["t"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Ids at the edges.


def test_out_of_range_ids_under_jit_read_nan_and_are_dropped_everywhere():
  params = _params()
  ids = jnp.array([-1, 2, V])
  rows = jax.jit(sparse_lookup)(params["t"], ids)
  assert np.isnan(rows[0]).all() and np.isnan(rows[2]).all()  # -1 is not row V-1.
  np.testing.assert_array_equal(rows[1], params["t"][2])
  loss = lambda p, i: jnp.sum(jnp.nan_to_num(sparse_lookup(p["t"], i)) @ p["w"])
  _, grads = jax.jit(sparse_value_and_grad(loss))(params, ids)
  np.testing.assert_array_equal(grads["t"].indices, [-1, 2, -1])
  rows_opt = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.0))
  state = rows_opt.init(params["t"])
  new, _ = jax.jit(rows_opt.update)(*grads["t"], state, params["t"])
  changed = np.flatnonzero(np.any(np.asarray(new != params["t"]), axis=1))
  np.testing.assert_array_equal(changed, [2])  # Neither row 0 nor row V-1.


def test_out_of_range_ids_eagerly_are_a_value_error():
  with pytest.raises(ValueError, match=r"\[0, 23\)"):
    sparse_lookup(_params()["t"], jnp.array([0, -1]))
  with pytest.raises(ValueError, match=r"\[0, 23\)"):
    sparse_lookup(_params()["t"], np.array([2**31 + 3], np.int64))


X64_SCRIPT = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, optax_sm3
table = jnp.arange(12.0).reshape(6, 2)
ids = jnp.array([2**31 + 3, 2**32 + 1, 4], jnp.int64)
rows = jax.jit(optax_sm3.sparse_lookup)(table, ids)
assert np.isnan(rows[0]).all() and np.isnan(rows[1]).all(), rows
np.testing.assert_array_equal(rows[2], table[4])
loss = lambda t, i: jnp.sum(jnp.nan_to_num(optax_sm3.sparse_lookup(t, i)))
_, g = jax.jit(optax_sm3.sparse_value_and_grad(loss))(table, ids)
np.testing.assert_array_equal(g.indices, [-1, -1, 4])
_, g = optax_sm3.sparse_value_and_grad(loss)(table, jnp.array([5, 0], jnp.int32))
np.testing.assert_array_equal(g.indices, [5, 0])  # int32 ids under x64
rows_opt = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.0))
new, _ = jax.jit(rows_opt.update)(ids, jnp.ones((3, 2)), rows_opt.init(table), table)
changed = np.flatnonzero(np.any(np.asarray(new != table), axis=1))
np.testing.assert_array_equal(changed, [4])
print("ok")
"""


def test_int64_ids_at_or_above_2_31_do_not_wrap_onto_a_row():
  import subprocess
  import sys

  from _subprocess import cpu_env

  proc = subprocess.run(
    [sys.executable, "-c", X64_SCRIPT],
    env=cpu_env(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[
    -3000:
  ]


# ---------------------------------------------------------------------------
# Property: random batch layouts under vmap train exactly like dense SM3.


@settings(max_examples=_tiers.examples(6, 2), deadline=None)
@given(
  batch=st.integers(1, 3),
  width=st.integers(1, 4),
  in_axis=st.sampled_from([0, 1]),
  checkpoint=st.booleans(),
  momentum=st.sampled_from([0.0, 0.9]),
  seed=st.integers(0, 2**16),
)
def test_vmapped_sparse_training_matches_dense_sm3(
  batch, width, in_axis, checkpoint, momentum, seed
):
  params = _params(seed)
  key = jax.random.key(seed + 1)
  shape = (batch, width) if in_axis == 0 else (width, batch)
  ids_steps = jax.random.randint(key, (3, *shape), 0, V)

  def per_example(t, w, r):
    return _row_loss(t, w, r)

  if checkpoint:
    per_example = jax.checkpoint(per_example)
  batched = jax.vmap(per_example, in_axes=(None, None, in_axis))

  def loss(p, i):
    return jnp.mean(batched(p["t"], p["w"], i))

  dense_tx = optax_sm3.sm3(0.1, momentum=momentum)
  rows_opt = optax_sm3.sparse_rows(dense_tx)
  w_tx = optax_sm3.sm3(0.1, momentum=momentum)
  dense, d_state = params, dense_tx.init(params)
  table, t_state = params["t"], rows_opt.init(params["t"])
  w, w_state = params["w"], w_tx.init(params["w"])
  dense_grad = jax.jit(jax.grad(_as_dense_loss(loss)))
  sparse_grad = jax.jit(sparse_value_and_grad(loss))
  for ids in ids_steps:
    g = dense_grad(dense, ids)
    updates, d_state = dense_tx.update(g, d_state, dense)
    dense = optax.apply_updates(dense, updates)
    # Rows left behind by momentum are caught up before the forward pass
    # (sparse_tables reads them through the state instead).
    table, t_state = rows_opt.sync(t_state, table)
    _, sg = sparse_grad({"t": table, "w": w}, ids)
    assert isinstance(sg["t"], SparseGrad)
    table, t_state = rows_opt.update(*sg["t"], t_state, table)
    w_up, w_state = w_tx.update(sg["w"], w_state, w)
    w = optax.apply_updates(w, w_up)
  table, _ = rows_opt.sync(t_state, table)
  np.testing.assert_allclose(table, dense["t"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w, dense["w"], rtol=1e-5, atol=1e-6)


def test_a_lookup_in_shard_map_is_a_clear_error():
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((1,), ("x",))

  def loss(p, i):
    body = lambda t, w, r: jnp.reshape(_row_loss(t, w, r), (1,))
    f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P())
    return jnp.sum(f(p["t"], p["w"], i))

  with pytest.raises(ValueError, match=r"(?s)shard_map.*before the loop"):
    sparse_value_and_grad(loss)(_params(), jnp.array([1, 2]))


def test_sparse_tables_reads_through_its_state_under_vmap_and_checkpoint():
  # With momentum, rows are read through the optimizer's state (the reader);
  # the reads sit under vmap and checkpoint inside the loss.
  params = _params()

  def loss(p, i):
    per = jax.checkpoint(lambda r: _row_loss(p["t"], p["w"], r))
    return jnp.sum(jax.vmap(per)(i) ** 2)

  dense_tx = optax_sm3.sm3(0.1, momentum=0.9)
  opt = optax_sm3.sparse_tables(dense_tx, tables={"t": True, "w": False})

  @jax.jit
  def step(p, state, i):
    _, grads = opt.value_and_grad(loss)(p, state, i)
    assert isinstance(grads["t"], SparseGrad)
    return opt.step(p, grads, state)

  sparse, state = params, opt.init(params)
  dense, d_state = params, dense_tx.init(params)
  for k in range(4):
    ids = (jnp.arange(6).reshape(2, 3) * (k + 3)) % V
    sparse, state = step(sparse, state, ids)
    g = jax.grad(_as_dense_loss(loss))(dense, ids)
    updates, d_state = dense_tx.update(g, d_state, dense)
    dense = optax.apply_updates(dense, updates)
  sparse, state = opt.sync(sparse, state)
  np.testing.assert_allclose(sparse["t"], dense["t"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sparse["w"], dense["w"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.uint16, jnp.uint32]
)
def test_ids_of_any_integer_dtype_come_back_as_the_looked_up_rows(dtype):
  params, ids = _params(), jnp.array([[1, 2, 3], [3, 4, 22]], dtype)
  loss = lambda p, i: _row_loss(p["t"], p["w"], i)
  _, grads = jax.jit(sparse_value_and_grad(loss))(params, ids)
  want = jax.grad(_as_dense_loss(loss))(params, ids)
  np.testing.assert_array_equal(grads["t"].indices, np.ravel(ids).astype(np.int32))
  np.testing.assert_allclose(_densify(grads["t"]), want["t"], rtol=1e-5, atol=1e-6)


def test_a_lookup_in_pmap_is_a_clear_error():
  def loss(p, i):
    f = jax.pmap(lambda r: _row_loss(p["t"], p["w"], r))
    return jnp.sum(f(i[None]))

  with pytest.raises(ValueError, match=r"(?s)jax\.pmap.*before the loop"):
    sparse_value_and_grad(loss)(_params(), jnp.array([1, 2]))
