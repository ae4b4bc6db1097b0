"""The JAX behaviours the sparse capture relies on, one named test each.

:mod:`optax_sm3._sparse._capture` uses public JAX API only, but it relies on
how that API behaves. Each test below checks one behaviour on JAX itself
(not through optax-sm3), so a JAX upgrade that changes it fails here, by
name, before it can change a gradient. The sparse guide lists them.
"""

from __future__ import annotations

import pathlib

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.xla_metadata import set_xla_metadata

LIBRARY = pathlib.Path(__file__).resolve().parents[1] / "optax_sm3"


def test_the_library_imports_no_jax_internals():
  offenders = [
    str(p.relative_to(LIBRARY))
    for p in LIBRARY.rglob("*.py")
    if "jax._src" in p.read_text() or "jax.interpreters" in p.read_text()
  ]
  assert not offenders, offenders


def test_custom_vjp_backward_output_reaches_the_outer_level_through_jit_and_remat():
  # The ids leave the differentiated function as a slot's cotangent.
  @jax.custom_vjp
  def emit(slot, code):
    del code
    return jnp.zeros(slot.shape[:-1])

  emit.defvjp(lambda s, c: (emit(s, c), c), lambda c, g: (c, jnp.zeros_like(c)))
  code = jnp.array([[3.0, 1.0], [7.0, 0.0]])

  def loss(slot):
    inner = jax.jit(jax.checkpoint(lambda s: emit(s, code)))
    return jnp.sum(inner(slot))

  np.testing.assert_array_equal(jax.grad(loss)(jnp.zeros((2, 2))), code)


def test_custom_vmap_rule_sees_the_batched_values_and_can_rebind():
  # The marker's rule re-binds itself one level out: the outermost call
  # sees every id of every vmap level.
  seen = []

  @custom_vmap
  def marker(ids):
    seen.append(ids.shape)
    return jnp.zeros(ids.shape, jnp.int32)

  @marker.def_vmap
  def rule(axis_size, in_batched, ids):
    del axis_size, in_batched
    return marker(ids), True

  jax.make_jaxpr(jax.vmap(jax.vmap(marker)))(jnp.zeros((2, 3, 4), jnp.int32))
  assert (2, 3, 4) in seen


def test_a_custom_vmap_call_names_its_rule_in_the_jaxpr():
  @custom_vmap
  def marker(ids):
    return ids

  def rule(axis_size, in_batched, ids):
    del axis_size, in_batched
    return ids, True

  marker.def_vmap(rule)
  jaxpr = jax.make_jaxpr(lambda x: jax.jit(marker)(x))(jnp.zeros(3))
  found = []

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name == "custom_vmap_call":
        r = eqn.params["rule"]
        found.append(getattr(r, "rule", getattr(r, "__wrapped__", r)))
      for v in eqn.params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
          if isinstance(item, jex.ClosedJaxpr):
            walk(item.jaxpr)
          elif isinstance(item, jex.Jaxpr):
            walk(item)

  walk(jaxpr.jaxpr)
  assert found == [rule]


def test_stop_gradient_leaves_the_tangent_unused():
  # A table read only through a lookup (held by stop_gradient in the
  # abstract pass) must show no use of its tangent in the jvp's jaxpr.
  def f(table, w):
    rows = jax.lax.stop_gradient(table)[jnp.array([1, 2])]
    return jnp.sum(rows @ w)

  jaxpr = jax.make_jaxpr(lambda p, t: jax.jvp(f, p, t))(
    (jnp.ones((4, 2)), jnp.ones(2)), (jnp.ones((4, 2)), jnp.ones(2))
  ).jaxpr
  table_tangent = jaxpr.invars[2]
  used = {v for eqn in jaxpr.eqns for v in eqn.invars if isinstance(v, jex.Var)}
  assert table_tangent not in used | set(jaxpr.outvars)


def test_xla_metadata_is_part_of_jits_cache_key():
  # Each capture pass traces inner jits anew under a metadata value of its
  # own (a cached trace would hold another pass's markers).
  traces = []

  @jax.jit
  def inner(x):
    traces.append(1)
    return x + 1

  inner(1.0)
  with set_xla_metadata(optax_sm3_capture="a"):
    inner(1.0)
  with set_xla_metadata(optax_sm3_capture="b"):
    inner(1.0)
  assert len(traces) == 3
