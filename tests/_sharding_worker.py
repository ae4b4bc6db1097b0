"""Multi-device checks for tests/test_sharding.py, run in a subprocess.

The 8 CPU devices must exist before JAX starts its backend, which the
single-device pytest process cannot do; this script sets ``XLA_FLAGS``
itself, runs every check, and prints one JSON object of measurements on its
last stdout line. The assertions live in the test module.
"""

from __future__ import annotations

import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sm3

STEPS = 4
SHAPES = {
  "emb": (64, 16),  # row-sharded embedding
  "emb2": (32, 16),  # row-and-column-sharded embedding
  "kernel": (16, 8),  # column-sharded dense kernel
  "bias": (8,),  # replicated
  "scale": (),  # replicated scalar
}
SPECS = {
  "8": {
    "emb": P("x", None),
    "emb2": P("x", None),
    "kernel": P(None, "x"),
    "bias": P(),
    "scale": P(),
  },
  "4x2": {
    "emb": P("x", None),
    "emb2": P("x", "y"),
    "kernel": P(None, "y"),
    "bias": P(),
    "scale": P(),
  },
}
MESHES = {"8": ((8,), ("x",)), "4x2": ((4, 2), ("x", "y"))}
_COLLECTIVE = re.compile(
  r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
  r"collective-permute)(-start)?\("
)
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def init_params():
  rng = np.random.default_rng(0)
  return {
    name: (0.5 * rng.normal(size=shape)).astype(np.float32)
    for name, shape in SHAPES.items()
  }


def batches():
  rng = np.random.default_rng(1)
  return [
    {
      "tok": rng.integers(0, 64, 16).astype(np.int32),
      "tok2": rng.integers(0, 32, 16).astype(np.int32),
      "y": rng.normal(size=(16, 8)).astype(np.float32),
    }
    for _ in range(STEPS)
  ]


def loss_fn(params, batch, explicit=False):
  if explicit:  # explicit mode asks where a gather's result lives
    h = params["emb"].at[batch["tok"]].get(out_sharding=P()) + params["emb2"].at[
      batch["tok2"]
    ].get(out_sharding=P())
  else:
    h = params["emb"][batch["tok"]] + params["emb2"][batch["tok2"]]
  out = params["scale"] * jnp.tanh(h @ params["kernel"] + params["bias"])
  return jnp.mean((out - batch["y"]) ** 2)


def make_step(tx, explicit=False):
  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch, explicit)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


@functools.cache
def train_reference(momentum):
  tx = optax_sm3.sm3(0.1, momentum=momentum)
  params = jax.device_put(init_params(), jax.devices()[0])
  state = tx.init(params)
  step = jax.jit(make_step(tx))
  for batch in batches():
    params, state = step(params, state, batch)
  return params


def per_device_bytes(tree):
  counts = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      counts[str(shard.device)] = counts.get(str(shard.device), 0) + shard.data.nbytes
  return counts


def expected_bytes(mesh_name, momentum, mesh):
  """Each device's share of the state, from the parameters' specs alone."""
  total = 4  # the int32 counter, replicated
  for name, shape in SHAPES.items():
    spec = tuple(SPECS[mesh_name][name])
    ways = [
      mesh.shape[e] if e else 1 for e in spec + (None,) * (len(shape) - len(spec))
    ]
    whole = math.prod(shape) * 4 // math.prod(ways)
    # Accumulators: one vector per axis (rank >= 2), else one of the shape.
    total += (
      sum(d * 4 // w for d, w in zip(shape, ways, strict=True))
      if len(shape) > 1
      else whole
    )
    total += whole if momentum else 0
  return total


def collectives(hlo):
  found = []
  for line in hlo.splitlines():
    match = _COLLECTIVE.search(line)
    if match:
      sizes = [
        math.prod(int(d) for d in dims.split(",") if d)
        for dims in _SHAPE.findall(match.group(1))
      ]
      found.append({"op": match.group(2), "elements": max(sizes, default=0)})
  return found


def sharded_run(mesh_name, momentum):
  shape, names = MESHES[mesh_name]
  mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
  param_sh = {k: NamedSharding(mesh, s) for k, s in SPECS[mesh_name].items()}
  tx = optax_sm3.sm3(0.1, momentum=momentum)
  params = jax.device_put(init_params(), param_sh)
  state_sh = optax_sm3.state_shardings(tx, params, param_sh)
  state = jax.jit(tx.init, out_shardings=state_sh)(params)
  init_types = [str(jax.typeof(x)) + str(x.sharding) for x in jax.tree.leaves(state)]
  data_sh = NamedSharding(mesh, P())
  step = jax.jit(
    make_step(tx),
    in_shardings=(param_sh, state_sh, data_sh),
    out_shardings=(param_sh, state_sh),
  )
  for batch in batches():
    params, state = step(params, state, batch)
  reference = train_reference(momentum)
  diffs = {
    k: float(np.max(np.abs(np.asarray(params[k]) - np.asarray(reference[k]))))
    for k in SHAPES
  }
  moved = {
    k: float(np.max(np.abs(np.asarray(reference[k]) - np.asarray(v))))
    for k, v in init_params().items()
  }

  # The optimizer alone, from gradients: every collective in it is SM3's.
  def opt_step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  hlo = (
    jax.jit(
      opt_step,
      in_shardings=(param_sh, state_sh, param_sh),
      out_shardings=(param_sh, state_sh),
    )
    .lower(params, state, params)
    .compile()
    .as_text()
  )
  accumulator_sizes = [x.size for x in jax.tree.leaves(state[0].accumulators)]
  sharded_param_sizes = [
    math.prod(SHAPES[k]) for k, s in SPECS[mesh_name].items() if any(s)
  ]
  return {
    "max_diff": diffs,
    "moved": moved,
    "types_stable": init_types
    == [str(jax.typeof(x)) + str(x.sharding) for x in jax.tree.leaves(state)],
    "state_specs": {
      k: [str(a.sharding.spec) for a in v] for k, v in state[0].accumulators.items()
    },
    "momentum_specs": (
      {k: str(v.sharding.spec) for k, v in state[1].momentum.items()}
      if momentum
      else None
    ),
    "bytes": per_device_bytes(state),
    "expected_bytes": expected_bytes(mesh_name, momentum, mesh),
    "replicated_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
    "collectives": collectives(hlo),
    "max_accumulator_elements": max(accumulator_sizes),
    "min_sharded_param_elements": min(sharded_param_sizes),
  }


def explicit_run():
  mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
  tx = optax_sm3.sm3(0.1, momentum=0.9)
  with jax.set_mesh(mesh):
    param_sh = {k: NamedSharding(mesh, s) for k, s in SPECS["4x2"].items()}
    params = jax.device_put(init_params(), param_sh)
    state_sh = optax_sm3.state_shardings(tx, params, param_sh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    types = lambda tree: [str(jax.typeof(x)) for x in jax.tree.leaves(tree)]
    after_init = types(state)
    grads = jax.jit(jax.grad(loss_fn), static_argnums=2)(params, batches()[0], True)
    _, eager = tx.update(grads, state, params)
    _, jitted = jax.jit(tx.update)(grads, state, params)
    step = jax.jit(make_step(tx, explicit=True))
    for batch in batches():
      params, state = step(params, state, batch)
    after_steps = types(state)
  reference = train_reference(0.9)
  return {
    "after_init": after_init,
    "after_update": types(eager),
    "after_jit_update": types(jitted),
    "after_jit_steps": after_steps,
    "sharded_types": [t for t in after_init if "@" in t],
    "max_diff": max(
      float(np.max(np.abs(np.asarray(params[k]) - np.asarray(reference[k]))))
      for k in SHAPES
    ),
  }


def main():
  assert jax.device_count() == 8, jax.devices()
  results = {
    f"{mesh}/{momentum}": sharded_run(mesh, momentum)
    for mesh in MESHES
    for momentum in (0.0, 0.9)
  }
  results["explicit"] = explicit_run()
  # A control for the HLO parser: replicating a row-sharded parameter must
  # show up as an all-gather of the whole parameter.
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
  gather = jax.jit(
    lambda x: x * 2,
    in_shardings=NamedSharding(mesh, P("x", None)),
    out_shardings=NamedSharding(mesh, P()),
  )
  results["control"] = collectives(
    gather.lower(jnp.zeros(SHAPES["emb"])).compile().as_text()
  )
  print(json.dumps(results))


if __name__ == "__main__":
  import _subprocess  # this script's folder, tests/, is on sys.path

  _subprocess.force_cpu_devices(8)
  main()
