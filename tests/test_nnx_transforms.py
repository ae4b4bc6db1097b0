"""SparseEmbed under Flax's transforms, tied tables, and linen's lifted transforms.

Each case trains the same model twice, with ``optax_sm3.nnx.value_and_grad``
+ ``SparseOptimizer`` and with ``nnx.value_and_grad`` + ``nnx.Optimizer``
over dense ``optax_sm3.sm3``, and checks that the tables and losses agree
and that the sparse route's table gradient is a ``SparseGrad``.
"""

from __future__ import annotations

import _tiers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import linen as nn
from flax import nnx

import optax_sm3
import optax_sm3.linen
import optax_sm3.nnx as sparse_nnx
from optax_sm3 import SparseGrad

V, D = 29, 4
IDS = jnp.array([[1, 2, 3], [3, 4, 28]])


class Model(nnx.Module):
  def __init__(self, mode: str, tie: str = "", *, sparse: bool = True):
    embed = sparse_nnx.SparseEmbed if sparse else nnx.Embed
    self.embed = embed(V, D, rngs=nnx.Rngs(0))
    self.out = nnx.Linear(D, 1, rngs=nnx.Rngs(1))
    if tie == "shared":  # A second tower over the same table Variable.
      self.embed2 = embed(V, D, rngs=nnx.Rngs(2))
      self.embed2.embedding = self.embed.embedding
    self.mode, self.tie = mode, tie

  def __call__(self, ids):
    embed, mode = self.embed, self.mode
    if mode == "plain":
      h = embed(ids)
    elif mode == "jax.vmap":
      h = jax.vmap(embed)(ids)
    elif mode == "jax.vmap(in_axes=1)":
      h = jnp.swapaxes(jax.vmap(embed, in_axes=1)(ids), 0, 1)
    elif mode == "nnx.vmap":
      h = nnx.vmap(lambda m, i: m(i), in_axes=(None, 0))(embed, ids)
    elif mode == "nnx.vmap(nnx.vmap)":
      inner = nnx.vmap(lambda m, i: m(i), in_axes=(None, 0))
      h = nnx.vmap(inner, in_axes=(None, 0))(embed, ids[..., None])[..., 0, :]
    elif mode == "nnx.remat":
      h = nnx.remat(lambda m, i: m(i))(embed, ids)
    elif mode == "jax.checkpoint":
      h = jax.checkpoint(lambda i: embed(i))(ids)
    elif mode == "nnx.jit":
      h = nnx.jit(lambda m, i: m(i))(embed, ids)
    elif mode == "nnx.scan":
      _, h = nnx.scan(
        lambda m, i: (m, m(i)), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0)
      )(embed, ids)
    else:
      raise AssertionError(mode)
    if self.tie == "shared":
      h = h + self.embed2(ids[..., ::-1])
    loss = jnp.sum(jnp.tanh(self.out(h)) ** 2)
    if self.tie == "attend":
      loss = loss + jnp.sum(jax.nn.logsumexp(embed.attend(h), axis=-1))
    return loss


def _train(mode, tie="", momentum=0.9, steps=3):
  sparse, dense = Model(mode, tie), Model("plain", tie, sparse=False)
  opt_s = sparse_nnx.SparseOptimizer(sparse, optax_sm3.sm3(0.05, momentum=momentum))
  opt_d = nnx.Optimizer(dense, optax_sm3.sm3(0.05, momentum=momentum), wrt=nnx.Param)

  @nnx.jit
  def step_sparse(model, optimizer, ids):
    loss, grads = sparse_nnx.value_and_grad(lambda m: m(ids))(model)
    optimizer.update(model, grads)
    return loss, grads

  @nnx.jit
  def step_dense(model, optimizer, ids):
    loss, grads = nnx.value_and_grad(lambda m: m(ids))(model)
    optimizer.update(model, grads)
    return loss

  for k in range(steps):
    ids = (IDS + 5 * k) % V
    loss_s, grads = step_sparse(sparse, opt_s, ids)
    loss_d = step_dense(dense, opt_d, ids)
    np.testing.assert_allclose(loss_s, loss_d, rtol=1e-5)
  opt_s.sync(sparse)
  np.testing.assert_allclose(
    sparse.embed.embedding[...], dense.embed.embedding[...], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(sparse.out.kernel[...], dense.out.kernel[...], rtol=1e-5)
  return sparse, opt_s, grads


MODES = [
  "plain",
  "jax.vmap",
  "jax.vmap(in_axes=1)",
  "nnx.vmap",
  "nnx.vmap(nnx.vmap)",
  "nnx.remat",
  "jax.checkpoint",
  "nnx.jit",
]


@pytest.mark.parametrize(
  "mode", _tiers.fast_first(MODES, ["plain", "nnx.vmap", "jax.checkpoint", "nnx.jit"])
)
def test_training_under_a_transform_equals_dense_sm3(mode):
  _, _, grads = _train(mode)
  assert isinstance(grads["embed"]["embedding"].get_value(), SparseGrad)


def test_a_lookup_in_nnx_scan_is_a_clear_error():
  with pytest.raises(ValueError, match=r"(?s)scan.*before the loop"):
    _train("nnx.scan", steps=1)


@pytest.mark.parametrize("mode", ["plain", "nnx.vmap"])
def test_tied_sparse_embeds_have_one_table_one_state_one_step(mode):
  model, optimizer, grads = _train(mode, tie="shared")
  is_var = lambda x: isinstance(x, nnx.Variable)
  shared = zip(
    jax.tree.leaves(model.embed.sparse_state, is_leaf=is_var),
    jax.tree.leaves(model.embed2.sparse_state, is_leaf=is_var),
    strict=True,
  )
  assert all(a is b for a, b in shared)
  table_states = [
    path for path, _ in nnx.to_flat_state(nnx.state(model, sparse_nnx.SparseState))
  ]
  assert {path[0] for path in table_states} == {"embed"}  # Not embed2's own.
  grad = grads["embed"]["embedding"].get_value()
  assert isinstance(grad, SparseGrad)
  assert grad.indices.shape == (2 * IDS.size,)  # Both towers' lookups, merged.
  assert "embed2" not in grads
  assert int(optimizer.step[...]) == 3


def test_a_table_also_read_by_attend_gets_one_dense_step():
  _, _, grads = _train("plain", tie="attend")
  grad = grads["embed"]["embedding"].get_value()
  assert not isinstance(grad, SparseGrad) and grad.shape == (V, D)


class LinenModel(nn.Module):
  mode: str

  @nn.compact
  def __call__(self, ids):
    if self.mode == "plain":
      embed = optax_sm3.linen.SparseEmbed(V, D, name="embed")
      h = embed(ids)
    elif self.mode == "nn.remat":
      h = nn.remat(optax_sm3.linen.SparseEmbed)(V, D, name="embed")(ids)
    elif self.mode == "nn.vmap":
      vmapped = nn.vmap(
        optax_sm3.linen.SparseEmbed,
        in_axes=0,
        variable_axes={"params": None},
        split_rngs={"params": False},
      )
      h = vmapped(V, D, name="embed")(ids)
    elif self.mode == "nn.jit":
      h = nn.jit(optax_sm3.linen.SparseEmbed)(V, D, name="embed")(ids)
    else:
      raise AssertionError(self.mode)
    return jnp.sum(jnp.tanh(nn.Dense(1, name="out")(h)) ** 2)


@pytest.mark.parametrize("mode", ["plain", "nn.remat", "nn.vmap", "nn.jit"])
def test_linen_lifted_transforms_give_exact_sparse_gradients(mode):
  model = LinenModel(mode)
  params = LinenModel("plain").init(jax.random.key(0), IDS)["params"]

  def loss(p, ids):
    return model.apply({"params": p}, ids)

  _, grads = jax.jit(optax_sm3.linen.value_and_grad(loss))(params, IDS)
  want = jax.grad(lambda p: LinenModel("plain").apply({"params": p}, IDS))(params)
  grad = grads["embed"]["embedding"]
  assert isinstance(grad, SparseGrad)
  dense = jnp.zeros((V, D)).at[grad.indices].add(grad.row_grads)
  np.testing.assert_allclose(dense, want["embed"]["embedding"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    grads["out"]["kernel"], want["out"]["kernel"], rtol=1e-5, atol=1e-6
  )


class LinenScan(nn.Module):
  @nn.compact
  def __call__(self, ids):
    scan = nn.scan(
      lambda mdl, c, i: (c + jnp.sum(mdl(i)), None),
      variable_broadcast="params",
      split_rngs={"params": False},
    )
    return scan(optax_sm3.linen.SparseEmbed(V, D, name="embed"), 0.0, ids)[0]


def test_a_lookup_in_linen_scan_is_a_clear_error():
  params = LinenScan().init(jax.random.key(0), IDS)["params"]
  loss = lambda p: LinenScan().apply({"params": p}, IDS)
  with pytest.raises(ValueError, match=r"(?s)nn\.scan.*before the loop"):
    optax_sm3.linen.value_and_grad(loss)(params)
