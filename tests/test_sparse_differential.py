"""Differential tests: every sparse route trains exactly as dense training.

Hypothesis draws a small model (tables looked up sparsely, read densely by
plain indexing or as a whole, both, tied, or marked but unused; lookups bare
or under ``vmap``, ``checkpoint``, nested ``jit`` and ``cond``), ids of a
random integer dtype and shape (duplicates, padding ids, empty batches), an
optimizer from the whole ``sm3`` / ``sm3_recipe`` option space and a short
training run (with gradient accumulation for the plain route). Each run
trains through a sparse route (plain JAX, Flax linen, Flax NNX, Equinox),
eagerly or under ``jit``, and through dense gradients (``jax.grad``) with the
same optimizer object; the parameters must agree to float rounding.

By default each route draws 3 examples; ``--slow`` draws 40 more per route.
"""

from __future__ import annotations

import dataclasses
import functools

import equinox as eqx
import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_sm3
import optax_sm3.equinox
import optax_sm3.linen
import optax_sm3.nnx

READS = ("lookup", "index", "whole", "lookup+index", "lookup+whole", "unused")
WRAPPERS = ("bare", "vmap", "remat", "jit", "cond", "jit+remat")
ID_DTYPES = ("int8", "int16", "int32", "uint8", "uint16", "uint32")
ROUTES = ("plain", "linen", "nnx", "equinox")


def _rising(count):
  return 1.0 - (count + 1.0) ** -0.8


def _decay_tables(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def _decay_rest(params):
  return jax.tree.map(lambda x: x.ndim < 2, params)


@st.composite
def optimizers(draw):
  """``(factory name, kwargs)`` of an optimizer from the whole option space."""
  if draw(st.booleans()):
    kwargs = dict(
      learning_rate=draw(st.sampled_from([3e-3, 3e-2])),
      total_steps=draw(st.integers(2, 8)),
      beta=draw(st.sampled_from([0.5, 0.9, 0.99])),
      bias_correction=draw(st.booleans()),
      weight_decay=draw(st.sampled_from([0.0, 0.05])),
      grad_clip_norm=draw(st.sampled_from([None, 0.5])),
      merge_axes_up_to=draw(st.sampled_from([None, 4, 2048])),
    )
    return "sm3_recipe", kwargs
  momentum = draw(st.sampled_from([0.0, None, 0.5, 0.9]))
  beta = draw(st.sampled_from([0.0, 0.5, 0.9, "rising"]))
  kwargs = dict(
    learning_rate=draw(st.sampled_from([0.05, "schedule"])),
    momentum=momentum,
    beta=beta,
    eps=draw(st.sampled_from([1e-8, 1e-3])),
    bias_correction=beta not in (0.0, "rising") and draw(st.booleans()),
    nesterov=bool(momentum) and draw(st.booleans()),
    mu_dtype=draw(st.sampled_from([None, None, "bfloat16"])) if momentum else None,
    weight_decay=draw(st.sampled_from([0.0, 0.01, 0.1])),
    weight_decay_mask=draw(st.sampled_from([None, "tables", "rest"])),
    grad_clip_norm=draw(st.sampled_from([None, 0.3, 10.0])),
    grad_clip_value=draw(st.sampled_from([None, 0.2])),
    variant=draw(st.sampled_from(["II", "I"])),
    merge_axes_up_to=draw(st.sampled_from([None, 3, 4096])),
    skip_unit_axes=draw(st.booleans()),
  )
  return "sm3", kwargs


def build(recipe):
  """The optimizer object of ``(name, kwargs)`` (one per training run)."""
  name, kwargs = recipe
  kwargs = dict(kwargs)
  if name == "sm3_recipe":
    return optax_sm3.sm3_recipe(**kwargs)
  if kwargs["learning_rate"] == "schedule":
    kwargs["learning_rate"] = optax.linear_schedule(0.1, 0.01, 5)
  if kwargs["beta"] == "rising":
    kwargs["beta"] = _rising
  if kwargs["mu_dtype"] == "bfloat16":
    kwargs["mu_dtype"] = jnp.bfloat16
  kwargs["weight_decay_mask"] = {
    None: None,
    "tables": _decay_tables,
    "rest": _decay_rest,
  }[kwargs["weight_decay_mask"]]
  return optax_sm3.sm3(**kwargs)


@dataclasses.dataclass(frozen=True)
class Model:
  """A small model: tables ``(V, D)``, how each is read, the training run."""

  shapes: tuple[tuple[int, int], ...]
  reads: tuple[str, ...]
  wrapper: str
  id_dtype: str
  batch: tuple[int, int]
  padding: tuple[int | None, ...]
  steps: int
  accumulate: int
  separate: bool  # table_tx apart from tx (multi_transform semantics)
  jit_step: bool


@st.composite
def models(draw, route):
  n = draw(st.integers(1, 2))
  id_dtype = draw(st.sampled_from(ID_DTYPES))
  # 300 rows: past int8's and uint8's range (a bound that must not wrap).
  shapes = tuple(
    (draw(st.sampled_from([3, 17, 40, 300])), draw(st.integers(1, 3))) for _ in range(n)
  )
  padding = tuple(
    draw(st.sampled_from([None, v - 1])) if route != "plain" else None
    for v, _ in shapes
  )
  return Model(
    shapes=shapes,
    reads=tuple(draw(st.sampled_from(READS)) for _ in range(n)),
    wrapper=draw(st.sampled_from(WRAPPERS)) if route == "plain" else "bare",
    id_dtype=id_dtype,
    batch=(draw(st.sampled_from([0, 1, 3])), draw(st.integers(1, 4))),
    padding=padding,
    steps=draw(st.integers(2, 3)),
    accumulate=draw(st.sampled_from([1, 2])) if route == "plain" else 1,
    separate=draw(st.booleans()),
    jit_step=draw(st.booleans()),
  )


def _wrap(wrapper, lookup, table, ids, w):
  """``lookup(table, ids)`` under the drawn transform."""
  if wrapper == "bare":
    return lookup(table, ids)
  if wrapper == "vmap":
    return jax.vmap(lambda i: lookup(table, i), in_axes=1, out_axes=1)(ids)
  if wrapper == "remat":
    return jax.checkpoint(lookup)(table, ids)
  if wrapper == "jit":
    return jax.jit(lookup)(table, ids)
  if wrapper == "jit+remat":
    return jax.jit(jax.checkpoint(lookup))(table, ids)
  assert wrapper == "cond"
  # Both branches look up; the predicate is traced (always true).
  return jax.lax.cond(
    jnp.sum(w) > -1e9,
    lambda: lookup(table, ids),
    lambda: 0.5 * lookup(table, ids),
  )


def loss_of(model, tables, w, ids_list, lookup, index, whole):
  """The loss, from each table's reads (``lookup``, ``index``, ``whole``)."""
  total = 0.1 * jnp.sum(w**2)
  for t, reads in enumerate(model.reads):
    table, ids = tables[t], ids_list[t]
    d = model.shapes[t][1]
    proj = w[:d]
    if "lookup" in reads:
      rows = _wrap(model.wrapper, functools.partial(lookup, t), table, ids, w)
      total = total + jnp.sum(jnp.tanh(rows @ proj) ** 2)
    if "index" in reads:
      rows = index(t, table, ids)
      total = total + jnp.sum(jnp.sin(rows * proj.reshape(1, 1, d)))
    if "whole" in reads:
      total = total + jnp.sum(jnp.tanh(whole(t, table, proj)))
  return total


def _wide(ids):
  """``ids`` as int32 for JAX's own reads: ``jnp.take`` and indexing raise an
  ``OverflowError`` for ``int8`` ids into a table of more than 127 rows (jax
  0.10.2), where the sparse lookups take the ids as they are."""
  return ids.astype(jnp.int32)


def _padded(model, t, rows, ids):
  pad = model.padding[t]
  if pad is None:
    return rows
  return jnp.where((ids.astype(jnp.int32) == pad)[..., None], 0.0, rows)


def functional_loss(model, lookup):
  """The loss of a params dict, lookups by ``lookup(t, table, ids)``."""

  def index(t, table, ids):
    return table[_wide(ids)]

  def whole(t, table, proj):
    return table @ proj

  def loss(params, ids_list):
    tables = [params[f"t{t}"] for t in range(len(model.shapes))]
    return loss_of(model, tables, params["w"], ids_list, lookup, index, whole)

  return loss


def dense_loss(model):
  """The loss of plain ``jnp.take`` reads (``nnx.Embed``, ``nn.Embed``)."""
  return functional_loss(
    model,
    lambda t, table, ids: _padded(model, t, jnp.take(table, _wide(ids), axis=0), ids),
  )


def initial(model, seed):
  rng = np.random.default_rng(seed)
  params = {}
  for t, (v, d) in enumerate(model.shapes):
    table = rng.normal(size=(v, d)).astype(np.float32)
    if model.padding[t] is not None:
      table[model.padding[t]] = 0.0
    params[f"t{t}"] = jnp.asarray(table)
  params["w"] = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
  return params


def batches(model, seed):
  """Each step's (each microbatch's) ids, one array per table."""
  rng = np.random.default_rng(seed + 1)
  out = []
  top = np.iinfo(model.id_dtype).max + 1
  for _ in range(model.steps * model.accumulate):
    out.append(
      [
        jnp.asarray(
          rng.integers(0, min(v, top), size=model.batch).astype(model.id_dtype)
        )
        for v, _ in model.shapes
      ]
    )
  return out


def _labels(params):
  return {k: ("t" if k.startswith("t") else "r") for k in params}


def train_dense(model, recipe, params, data):
  opt = build(recipe)
  if model.separate:
    opt = optax.multi_transform({"t": opt, "r": optax.adam(1e-2)}, _labels(params))
  if model.accumulate > 1:
    opt = optax.MultiSteps(opt, model.accumulate)
  state = opt.init(params)
  grad = jax.grad(dense_loss(model))
  for ids_list in data:
    updates, state = opt.update(grad(params, ids_list), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _optimizers(model, recipe):
  """``(tx, table_tx)``: one object for both, or Adam for the rest."""
  opt = build(recipe)
  return (optax.adam(1e-2), opt) if model.separate else (opt, None)


def _maybe_jit(model, fn, **kwargs):
  return jax.jit(fn, **kwargs) if model.jit_step else fn


def train_plain(model, recipe, params, data):
  loss = functional_loss(
    model, lambda t, table, ids: optax_sm3.sparse_lookup(table, ids)
  )

  tx, table_tx = _optimizers(model, recipe)
  mask = {k: k.startswith("t") for k in params}
  opt = optax_sm3.sparse_tables(tx, table_tx, tables=mask)
  if model.accumulate > 1:
    opt = optax_sm3.sparse_multi_steps(opt, model.accumulate)
    like = jax.eval_shape(
      lambda p, i: optax_sm3.sparse_value_and_grad(loss)(p, i)[1], params, data[0]
    )
    state = opt.init(params, like)
  else:
    state = opt.init(params)

  def step(params, state, ids_list):
    _, grads = opt.value_and_grad(loss)(params, state, ids_list)
    return opt.step(params, grads, state)

  step = _maybe_jit(model, step)
  for ids_list in data:
    params, state = step(params, state, ids_list)
  return opt.sync(params, state)[0]


class _NNXModel(nnx.Module):
  def __init__(self, model, params):
    self.model = model
    self.embeds = nnx.List(
      [
        optax_sm3.nnx.SparseEmbed(v, d, padding_id=model.padding[t], rngs=nnx.Rngs(0))
        for t, (v, d) in enumerate(model.shapes)
      ]
    )
    for t, embed in enumerate(self.embeds):
      embed.embedding[...] = params[f"t{t}"]
    self.w = nnx.Param(params["w"])

  def __call__(self, ids_list):
    def lookup(t, table, ids):
      del table
      return self.embeds[t](ids)

    def index(t, table, ids):
      return self.embeds[t].embedding[...][_wide(ids)]

    def whole(t, table, proj):
      return self.embeds[t].attend(proj)

    tables = [None] * len(self.embeds)
    return loss_of(self.model, tables, self.w[...], ids_list, lookup, index, whole)


def train_nnx(model, recipe, params, data):
  net = _NNXModel(model, params)
  tx, table_tx = _optimizers(model, recipe)
  opt = optax_sm3.nnx.SparseOptimizer(net, tx, table_tx)

  def step(net, opt, ids_list):
    _, grads = optax_sm3.nnx.value_and_grad(lambda m: m(ids_list))(net)
    opt.update(net, grads)

  step = nnx.jit(step) if model.jit_step else step
  for ids_list in data:
    step(net, opt, ids_list)
  opt.sync(net)
  out = {f"t{t}": e.embedding[...] for t, e in enumerate(net.embeds)}
  out["w"] = net.w[...]
  return out


class _LinenModel(nn.Module):
  model: Model

  @nn.compact
  def __call__(self, ids_list):
    embeds = [
      optax_sm3.linen.SparseEmbed(v, d, padding_id=self.model.padding[t], name=f"t{t}")
      for t, (v, d) in enumerate(self.model.shapes)
    ]
    w = self.param("w", nn.initializers.zeros, (3,))

    def lookup(t, table, ids):
      del table
      return embeds[t](ids)

    def index(t, table, ids):
      return embeds[t].embedding[_wide(ids)]

    def whole(t, table, proj):
      return embeds[t].attend(proj)

    tables = [None] * len(embeds)
    return loss_of(self.model, tables, w, ids_list, lookup, index, whole)


def train_linen(model, recipe, params, data):
  net = _LinenModel(model)
  variables = {
    "params": {
      **{f"t{t}": {"embedding": params[f"t{t}"]} for t in range(len(model.shapes))},
      "w": params["w"],
    }
  }
  tx, table_tx = _optimizers(model, recipe)
  mask = {
    **{f"t{t}": {"embedding": True} for t in range(len(model.shapes))},
    "w": False,
  }
  state = optax_sm3.linen.SparseTrainState.create(
    apply_fn=net.apply,
    params=variables["params"],
    tx=optax_sm3.sparse_tables(tx, table_tx, tables=mask),
  )

  def step(state, ids_list):
    def loss(p, ids_list):
      return state.apply_fn({"params": p}, ids_list)

    _, grads = state.value_and_grad(loss)(ids_list)
    return state.apply_gradients(grads=grads)

  step = _maybe_jit(model, step)
  for ids_list in data:
    state = step(state, ids_list)
  p = state.sync().params
  out = {f"t{t}": p[f"t{t}"]["embedding"] for t in range(len(model.shapes))}
  out["w"] = p["w"]
  return out


class _EqxModel(eqx.Module):
  embeds: list
  w: jax.Array
  model: Model = eqx.field(static=True)

  def __call__(self, ids_list):
    def lookup(t, table, ids):
      del table
      rows = self.embeds[t](ids)
      return _padded(self.model, t, rows, ids)

    def index(t, table, ids):
      return self.embeds[t].weight[_wide(ids)]

    def whole(t, table, proj):
      return self.embeds[t].weight @ proj

    tables = [None] * len(self.embeds)
    return loss_of(self.model, tables, self.w, ids_list, lookup, index, whole)


def train_equinox(model, recipe, params, data):
  net = _EqxModel(
    [
      optax_sm3.equinox.SparseEmbedding(weight=params[f"t{t}"])
      for t in range(len(model.shapes))
    ],
    params["w"],
    model,
  )
  tx, table_tx = _optimizers(model, recipe)
  opt = optax_sm3.equinox.SparseOptimizer(tx, table_tx)
  state = opt.init(net)

  def step(net, state, ids_list):
    _, grads = opt.filter_value_and_grad(lambda m: m(ids_list))(net, state)
    return opt.step(net, grads, state)

  step = eqx.filter_jit(step) if model.jit_step else step
  for ids_list in data:
    net, state = step(net, state, ids_list)
  net, _ = opt.sync(net, state)
  out = {f"t{t}": e.weight for t, e in enumerate(net.embeds)}
  out["w"] = net.w
  return out


TRAIN = {
  "plain": train_plain,
  "linen": train_linen,
  "nnx": train_nnx,
  "equinox": train_equinox,
}


def _tolerance(recipe):
  if recipe[1].get("mu_dtype") == "bfloat16":
    return 3e-2  # The dense path rounds the bf16 buffer every step.
  return 2e-5


def check_route(route, model, recipe, seed=0):
  params = initial(model, seed)
  data = batches(model, seed)
  expected = train_dense(model, recipe, params, data)
  got = TRAIN[route](model, recipe, params, data)
  tol = _tolerance(recipe)
  for key in expected:
    scale = 1.0 + float(jnp.max(jnp.abs(expected[key])))
    np.testing.assert_allclose(
      np.asarray(got[key]),
      np.asarray(expected[key]),
      rtol=0,
      atol=tol * scale,
      err_msg=f"{route} route, leaf {key}, {model}, {recipe}",
    )


def _draw_and_check(route, data):
  model = data.draw(models(route), label="model")
  recipe = data.draw(optimizers(), label="optimizer")
  check_route(route, model, recipe)


@pytest.mark.parametrize("route", ROUTES)
@hypothesis.settings(max_examples=3, deadline=None)
@hypothesis.given(data=st.data())
def test_every_route_trains_as_dense(route, data):
  _draw_and_check(route, data)


@pytest.mark.slow
@pytest.mark.parametrize("route", ROUTES)
@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(data=st.data())
def test_every_route_trains_as_dense_many(route, data):
  _draw_and_check(route, data)
