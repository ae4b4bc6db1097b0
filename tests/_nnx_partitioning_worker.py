"""Multi-device checks for tests/test_nnx_partitioning.py, run in a subprocess.

Flax's sharding idiom on 8 CPU devices: kernels annotated with
``nnx.with_partitioning`` (``nn.with_partitioning`` in linen), the optimizer
built under ``jax.set_mesh``. Records, for ``nnx.Optimizer`` and for a linen
``TrainState`` with our transformations, the shardings the state's arrays
actually have, the specs Flax reads off its metadata, what
``optax_sm3.state_partition_specs`` gives for the same parameters, and the
parameters after a few jitted steps against the same steps on one device.
Prints one JSON object on its last stdout line; the assertions live in the
test module.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sm3

STEPS = 3
# name: (shape, names), on a ("data", "model") mesh of 2 x 4.
PARAMS = {
  "w": ((16, 8), ("data", "model")),
  "kernel": ((8, 4), ("model", None)),
  "conv": ((3, 3, 8, 16), (None, None, "data", "model")),
  "bias": ((4,), None),
}
MESH_SHAPE, MESH_AXES = (2, 4), ("data", "model")
TXS = {
  "sm3": lambda: optax_sm3.sm3(0.1, momentum=0.9),
  "sm3-m0": lambda: optax_sm3.sm3(0.1, momentum=0.0),
  "merged": lambda: optax_sm3.sm3(0.1, momentum=0.9, merge_axes_up_to=9),
  "scale_by_sm3": lambda: optax.chain(optax_sm3.scale_by_sm3(), optax.scale(-0.1)),
  # Merged covers: the (16, 8) kernel's 128 entries in one (16, 8) accumulator.
  "recipe": lambda: optax_sm3.sm3_recipe(0.1, 100),
}
X = np.linspace(-1.0, 1.0, 2 * 16, dtype=np.float32).reshape(2, 16)


def initial_values():
  rng = np.random.default_rng(0)
  return {
    name: (0.3 * rng.normal(size=shape)).astype(np.float32)
    for name, (shape, _) in PARAMS.items()
  }


def loss_of(values, x):
  h = jnp.tanh(x @ values["w"]) @ values["kernel"] + values["bias"]
  return jnp.sum(h**2) + jnp.sum(jnp.sin(values["conv"]) * jnp.mean(h))


def param_specs():
  return {name: P(*names) if names else P() for name, (_, names) in PARAMS.items()}


def expected_specs(tx_name):
  """``state_partition_specs`` of the plain parameters, as strings per leaf."""
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, (s, _) in PARAMS.items()}
  specs = optax_sm3.state_partition_specs(TXS[tx_name](), params, param_specs())
  return spec_strings(specs)


def spec_strings(tree):
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, P))
  return [str(normalized(s)) for s in leaves]


def normalized(spec):
  """``spec`` with trailing ``None`` entries dropped (``P('a', None) == P('a')``)."""
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def actual_specs(tree, mesh):
  """Each array's sharding as a spec on ``mesh`` (checked to be on it)."""
  out = []
  for leaf in jax.tree.leaves(tree):
    sharding = leaf.sharding
    assert isinstance(sharding, NamedSharding), sharding
    assert sharding.mesh.shape == mesh.shape, sharding
    out.append(str(normalized(sharding.spec)))
  return out


def per_device_elements(tree):
  return [
    sorted({s.data.size for s in leaf.addressable_shards})
    for leaf in jax.tree.leaves(tree)
  ]


def nnx_run(tx_name, axis_type):
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, values, annotated):
      for name, (_, names) in PARAMS.items():
        value = jnp.asarray(values[name])
        if names is None or not annotated:
          setattr(self, name, nnx.Param(value))
        else:
          init = nnx.with_partitioning(lambda *_, v=value: v, names)
          setattr(self, name, nnx.Param(init(None, value.shape)))

    def values(self):
      return {name: getattr(self, name)[...] for name in PARAMS}

  loss = loss_of
  if axis_type == AxisType.Explicit:
    # The model's matmuls contract sharded axes: explicit mode wants their
    # output sharding spelled out; the optimizer's step is what is tested.
    loss = jax.sharding.auto_axes(loss_of, out_sharding=P())

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: loss(m.values(), X))(model)
    optimizer.update(model, grads)

  values = initial_values()
  reference = Model(values, annotated=False)
  ref_opt = nnx.Optimizer(reference, TXS[tx_name](), wrt=nnx.Param)
  for _ in range(STEPS):
    step(reference, ref_opt)

  mesh = jax.make_mesh(MESH_SHAPE, MESH_AXES, axis_types=(axis_type,) * 2)
  with jax.set_mesh(mesh):
    model = Model(values, annotated=True)
    optimizer = nnx.Optimizer(model, TXS[tx_name](), wrt=nnx.Param)
    state = nnx.as_pure(optimizer.opt_state)
    after_init = actual_specs(state, mesh)
    (sm3_state,) = [
      x
      for x in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, optax_sm3.ScaleBySM3State)
      )
      if isinstance(x, optax_sm3.ScaleBySM3State)
    ]
    elements = per_device_elements(sm3_state.accumulators["w"])
    metadata = spec_strings(nnx.as_pure(nnx.get_partition_spec(optimizer.opt_state)))
    named = nnx.as_pure(nnx.get_named_sharding(optimizer.opt_state, mesh))
    named_ok = all(
      isinstance(n, NamedSharding)
      and n.mesh == mesh
      and n.is_equivalent_to(a.sharding, a.ndim)
      for n, a in zip(jax.tree.leaves(named), jax.tree.leaves(state), strict=True)
    )
    params = nnx.state(model, nnx.Param)
    tx = TXS[tx_name]()
    out = optax_sm3.state_shardings(tx, params, nnx.get_named_sharding(params, mesh))
    jitted_init = actual_specs(jax.jit(tx.init, out_shardings=out)(params), mesh)
    for _ in range(STEPS):
      step(model, optimizer)
    after_steps = actual_specs(nnx.as_pure(optimizer.opt_state), mesh)
    diff = max(
      float(
        np.max(
          np.abs(np.asarray(model.values()[k]) - np.asarray(reference.values()[k]))
        )
      )
      for k in PARAMS
    )
    moved = max(
      float(np.max(np.abs(np.asarray(model.values()[k]) - values[k]))) for k in PARAMS
    )
  return {
    "expected": expected_specs(tx_name),
    "after_init": after_init,
    "metadata": metadata,
    "named_sharding_matches": named_ok,
    "after_steps": after_steps,
    "jitted_init": jitted_init,
    "elements": elements,
    "diff": diff,
    "moved": moved,
  }


def linen_run(tx_name):
  import flax.linen as nn
  from flax.training import train_state

  values = initial_values()

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      got = {}
      for name, (_, names) in PARAMS.items():
        init = lambda *_, v=values[name]: jnp.asarray(v)
        if names is not None:
          init = nn.with_partitioning(init, names)
        got[name] = self.param(name, init)
      return loss_of(got, x)

  model = Model()
  tx = TXS[tx_name]()  # one object: the TrainState's static metadata

  def create(key):
    params = model.init(key, X)["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def step(state):
    grads = jax.grad(lambda p: state.apply_fn({"params": p}, X))(state.params)
    return state.apply_gradients(grads=grads)

  reference = create(jax.random.key(0))
  for _ in range(STEPS):
    reference = step(reference)

  mesh = jax.make_mesh(MESH_SHAPE, MESH_AXES, axis_types=(AxisType.Auto,) * 2)
  abstract = jax.eval_shape(create, jax.random.key(0))
  metadata = spec_strings(nn.get_partition_spec(abstract).opt_state)
  with jax.set_mesh(mesh):
    state = jax.jit(create, out_shardings=nn.get_sharding(abstract, mesh))(
      jax.random.key(0)
    )
    after_init = actual_specs(state.opt_state, mesh)
    structure = jax.tree.structure(state.opt_state)
    for _ in range(STEPS):
      state = step(state)
    after_steps = actual_specs(state.opt_state, mesh)
  plain = lambda p: {k: np.asarray(v) for k, v in nn.unbox(p).items()}
  got, want = plain(state.params), plain(reference.params)
  return {
    "expected": expected_specs(tx_name),
    "metadata": metadata,
    "after_init": after_init,
    "after_steps": after_steps,
    "structure_stable": jax.tree.structure(state.opt_state) == structure,
    "diff": max(float(np.max(np.abs(got[k] - want[k]))) for k in PARAMS),
    "moved": max(float(np.max(np.abs(got[k] - values[k]))) for k in PARAMS),
  }


def optax_run(name):
  """Whether optax's own optimizer survives the nnx idiom (a record, no claim)."""
  from flax import nnx

  tx = {
    "optax.sm3": lambda: optax.sm3(0.1),
    "optax.adafactor": lambda: optax.adafactor(0.1),
  }[name]

  class Model(nnx.Module):
    def __init__(self):
      init = nnx.with_partitioning(nnx.initializers.ones, ("data", "model"))
      self.w = nnx.Param(init(jax.random.key(0), (16, 8)))

  mesh = jax.make_mesh(MESH_SHAPE, MESH_AXES, axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    try:
      nnx.Optimizer(Model(), tx(), wrt=nnx.Param)
    except ValueError as error:
      return f"ValueError: {str(error)[:120]}"
  return "ok"


def main():
  assert jax.device_count() == 8, jax.devices()
  results = {}
  for tx_name in TXS:
    results[f"nnx/auto/{tx_name}"] = nnx_run(tx_name, AxisType.Auto)
    results[f"linen/{tx_name}"] = linen_run(tx_name)
  results["nnx/explicit/sm3"] = nnx_run("sm3", AxisType.Explicit)
  for name in ("optax.sm3", "optax.adafactor"):
    results[name] = optax_run(name)
  print(json.dumps(results))


if __name__ == "__main__":
  import _subprocess  # this script's folder, tests/, is on sys.path

  _subprocess.force_cpu_devices(8)
  main()
