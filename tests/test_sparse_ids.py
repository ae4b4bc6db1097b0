"""Ids of every integer dtype read and train the rows the frameworks' own embeddings do.

``nnx.Embed``, ``nn.Embed`` and ``eqx.nn.Embedding`` read ``table[ids]`` for
ids of any integer dtype. The sparse embeddings and ``sparse_lookup`` must
read the same rows, and their row-sparse gradients name the same rows, for
``int8`` to ``uint64`` (the 64-bit ones with x64 on, in a subprocess), of any
shape; no bound, padding id or fill value may wrap in a narrow dtype.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import _tiers
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_sm3
import optax_sm3.equinox
import optax_sm3.linen
import optax_sm3.nnx

DTYPES_32 = ("int8", "int16", "int32", "uint8", "uint16", "uint32")
ROWS = 300


def _dense(grad, rows):
  """A SparseGrad's dense form, ``zeros.at[indices].add(row_grads)``."""
  zeros = jnp.zeros((rows, *grad.row_grads.shape[1:]), grad.row_grads.dtype)
  return zeros.at[grad.indices].add(grad.row_grads)


def _ids(dtype: str, shape=(2, 3)) -> np.ndarray:
  """Ids spread over the dtype's range that fits the table (128+ for 8 bits)."""
  top = min(np.iinfo(dtype).max, ROWS - 1)
  values = np.array([0, 3, top // 2, top - 1, top, 7])
  return values[: int(np.prod(shape))].reshape(shape).astype(dtype)


def _table():
  return jax.random.normal(jax.random.key(0), (ROWS, 3))


@pytest.mark.parametrize("dtype", _tiers.fast_first(DTYPES_32, [jnp.int8, jnp.uint32]))
def test_nnx_sparse_embed_reads_and_trains_nnx_embeds_rows(dtype):
  ids = _ids(dtype)
  sparse = optax_sm3.nnx.SparseEmbed(ROWS, 3, rngs=nnx.Rngs(0))
  plain = nnx.Embed(ROWS, 3, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(sparse(jnp.asarray(ids)), plain(jnp.asarray(ids)))
  np.testing.assert_array_equal(
    sparse(jnp.asarray(ids)), sparse(jnp.asarray(ids.astype(np.int32)))
  )
  loss = lambda m: jnp.sum(m(jnp.asarray(ids)) ** 2)
  dense = nnx.grad(loss)(plain)["embedding"][...]
  _, grads = optax_sm3.nnx.value_and_grad(loss)(sparse)
  g = grads["embedding"].get_value()
  np.testing.assert_array_equal(g.indices, ids.reshape(-1).astype(np.int32))
  np.testing.assert_allclose(_dense(g, ROWS), dense, rtol=1e-6)
  # Plain nnx.grad through the SparseEmbed (a dense gradient) too.
  np.testing.assert_allclose(nnx.grad(loss)(sparse)["embedding"][...], dense)


@pytest.mark.parametrize("dtype", DTYPES_32)
def test_linen_sparse_embed_reads_nn_embeds_rows(dtype):
  ids = jnp.asarray(_ids(dtype))
  sparse = optax_sm3.linen.SparseEmbed(ROWS, 3)
  plain = nn.Embed(ROWS, 3)
  params = plain.init(jax.random.key(0), ids)
  np.testing.assert_array_equal(sparse.apply(params, ids), plain.apply(params, ids))
  loss = lambda p: jnp.sum(sparse.apply({"params": p}, ids) ** 2)
  dense = jax.grad(lambda p: jnp.sum(plain.apply({"params": p}, ids) ** 2))(
    params["params"]
  )
  _, grads = optax_sm3.sparse_value_and_grad(loss)(params["params"])
  np.testing.assert_allclose(
    _dense(grads["embedding"], ROWS), dense["embedding"], rtol=1e-6
  )


@pytest.mark.parametrize("dtype", DTYPES_32)
def test_equinox_sparse_embedding_reads_eqx_embeddings_rows(dtype):
  ids = jnp.asarray(_ids(dtype))
  sparse = optax_sm3.equinox.SparseEmbedding(ROWS, 3, key=jax.random.key(0))
  plain = eqx.nn.Embedding(ROWS, 3, key=jax.random.key(0))
  np.testing.assert_array_equal(sparse(ids), jax.vmap(jax.vmap(plain))(ids))
  _, grads = optax_sm3.equinox.filter_value_and_grad(lambda m: jnp.sum(m(ids) ** 2))(
    sparse
  )
  dense = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(jax.vmap(m))(ids) ** 2))(plain)
  np.testing.assert_allclose(_dense(grads.weight, ROWS), dense.weight, rtol=1e-6)


@pytest.mark.parametrize("dtype", _tiers.fast_first(DTYPES_32, [jnp.int8, jnp.uint32]))
def test_sparse_lookup_and_update_take_every_dtype(dtype):
  ids = _ids(dtype, (6,))
  table = _table()
  np.testing.assert_array_equal(
    optax_sm3.sparse_lookup(table, jnp.asarray(ids)), table[ids.astype(np.int64)]
  )
  opt = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.0))
  state = opt.init(table)
  grads = jnp.ones((6, 3))
  got, _ = opt.update(jnp.asarray(ids), grads, state, table)
  want, _ = opt.update(jnp.asarray(ids.astype(np.int32)), grads, state, table)
  np.testing.assert_array_equal(got, want)


def test_a_padding_id_past_a_narrow_dtype_masks_nothing():
  # 299 is no uint8 id: the id 43 (299 mod 256) must read its own row.
  embed = optax_sm3.nnx.SparseEmbed(ROWS, 3, padding_id=299, rngs=nnx.Rngs(0))
  rows = embed(jnp.asarray([43, 255], jnp.uint8))
  np.testing.assert_array_equal(rows, embed.embedding[...][jnp.array([43, 255])])
  linen = optax_sm3.linen.SparseEmbed(ROWS, 3, padding_id=299)
  params = linen.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))
  ids = jnp.asarray([43], jnp.uint8)
  np.testing.assert_array_equal(
    linen.apply(params, ids), params["params"]["embedding"][jnp.array([43])]
  )


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint32"])
def test_ids_out_of_range_follow_the_one_rule(dtype):
  # Concrete: a ValueError naming the range. Traced: NaN rows, no update.
  table = _table()[:100]
  bad = np.array([150 if dtype != "int8" else -3], dtype)
  with pytest.raises(ValueError, match=r"\[0, 100\)"):
    optax_sm3.sparse_lookup(table, bad)
  rows = jax.jit(optax_sm3.sparse_lookup)(table, jnp.asarray(bad))
  assert bool(jnp.all(jnp.isnan(rows)))
  opt = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.0))
  state = opt.init(table)
  new, _ = jax.jit(opt.update)(jnp.asarray(bad), jnp.ones((1, 3)), state, table)
  np.testing.assert_array_equal(new, table)


X64_SCRIPT = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  from flax import nnx
  import optax_sm3, optax_sm3.nnx
  assert jax.config.jax_enable_x64
  for dtype in ("int64", "uint64", "int32", "uint8"):
    ids = np.array([[0, 3], [255, 200]], dtype)
    sparse = optax_sm3.nnx.SparseEmbed(300, 3, rngs=nnx.Rngs(0))
    plain = nnx.Embed(300, 3, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(sparse(jnp.asarray(ids)), plain(jnp.asarray(ids)))
    loss = lambda m: jnp.sum(m(jnp.asarray(ids)) ** 2)
    _, grads = optax_sm3.nnx.value_and_grad(loss)(sparse)
    dense = nnx.grad(loss)(plain)["embedding"][...]
    g = grads["embedding"].get_value()
    np.testing.assert_array_equal(g.indices, ids.reshape(-1))
    dense_g = jnp.zeros((300, 3)).at[g.indices].add(g.row_grads)
    np.testing.assert_allclose(dense_g, dense, rtol=1e-6)
  table = jnp.ones((10, 2))
  big = np.array([2**32 + 3], np.uint64)  # would wrap onto row 3 in 32 bits
  try:
    optax_sm3.sparse_lookup(table, big)
  except ValueError as error:
    assert "[0, 10)" in str(error)
  else:
    raise AssertionError("no ValueError")
  rows = jax.jit(optax_sm3.sparse_lookup)(table, jnp.asarray(big))
  assert bool(jnp.all(jnp.isnan(rows)))
  print("ok")
  """
)


@pytest.mark.slow  # a worker process with x64 on
def test_64_bit_ids_with_x64_on():
  env = {**__import__("os").environ, "JAX_ENABLE_X64": "1"}
  out = subprocess.run(
    [sys.executable, "-c", X64_SCRIPT],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ok")
