"""Multi-device checks for tests/test_accumulate_sharded.py, run in a subprocess.

The 8 CPU devices must exist before JAX starts its backend, so this script
sets ``XLA_FLAGS`` itself (see ``tests/_sharding_worker.py``), runs every
check and prints one JSON object on its last stdout line. The assertions
live in the test module.

Every parameter here has more than 2**16 entries, so SM3 takes the CPU loop
(per shard, ``optax_sm3._partitioned``); the references are the same
optimizer on one device, looped and direct (``block_size=0``).
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sm3

STEPS = 2
SHAPES = {
  "emb": (4096, 256),
  "conv": (3, 3, 64, 128),
  "stack": (2, 256, 256),  # two layers, each with a cover of its own
  "bias": (64,),  # below the loop's threshold: direct
}
STACKED = {"emb": 0, "conv": 0, "stack": 1, "bias": 0}
# (mesh shape, mesh axes, parameter specs)
LAYOUTS = {
  "rows": (
    (8,),
    ("x",),
    {
      "emb": P("x", None),
      "conv": P(None, None, "x", None),
      "stack": P(None, "x", None),
      "bias": P(),
    },
  ),
  "columns": (
    (8,),
    ("x",),
    {
      "emb": P(None, "x"),
      "conv": P(None, None, None, "x"),
      "stack": P(None, None, "x"),
      "bias": P("x"),
    },
  ),
  "2d": (
    (4, 2),
    ("x", "y"),
    {
      "emb": P("x", "y"),
      "conv": P(None, None, "y", "x"),
      "stack": P("y", "x", None),  # the stacked axis is never reduced over
      "bias": P(),
    },
  ),
  "replicated": ((8,), ("x",), {k: P() for k in SHAPES}),
}
# Blocks of 2**12 entries: 2**9 per device (eight on this host), so every
# shard is looped over several blocks.
BLOCK = 1 << 12
# name: (layout, dtype, optimizer settings)
CASES = {
  "rows": ("rows", "float32", {"momentum": 0.9}),
  "columns": ("columns", "float32", {"momentum": 0.0, "block": None}),
  "2d/bf16": ("2d", "bfloat16", {"momentum": 0.9}),
  "replicated/sm3-I": (
    "replicated",
    "float32",
    {"momentum": 0.0, "beta": 0.5, "variant": "I"},
  ),
}


def make_tx(settings, block=BLOCK):
  """The case's optimizer; ``block=0`` (direct) overrides the case's block."""
  settings = dict(settings)
  case_block = settings.pop("block", block)
  block = 0 if block == 0 else case_block
  return optax_sm3.sm3(0.1, stacked_axes=STACKED, block_size=block, **settings)


def trees(dtype):
  rng = np.random.default_rng(0)
  make = lambda: {
    k: rng.normal(size=s).astype(np.float32).astype(dtype) for k, s in SHAPES.items()
  }
  return make(), [make() for _ in range(STEPS)]


def opt_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def train(step, params, state, grads):
  for g in grads:
    params, state = step(params, state, g)
  return params, state


@functools.cache
def one_device(case):
  """The case on one device, in the direct form: (params, state)."""
  _, dtype, settings = CASES[case]
  tx = make_tx(settings, 0)
  params, grads = jax.device_put(trees(dtype), jax.devices()[0])
  return train(jax.jit(opt_step(tx)), params, jax.jit(tx.init)(params), grads)


def same(tree, expected) -> bool:
  """Bit for bit (dtypes included)."""
  leaves, expected = jax.tree.leaves(tree), jax.tree.leaves(expected)
  return len(leaves) == len(expected) and all(
    a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(leaves, expected, strict=True)
  )


def max_diff(tree, expected) -> float:
  return max(
    float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(expected), strict=True)
  )


def collectives(hlo):
  """``(op, largest operand or result elements)`` of every collective."""
  found = []
  for line in hlo.splitlines():
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
      if f" {op}(" in line or f" {op}-start(" in line:
        dims = [
          math.prod(int(d) for d in group.split(",") if d)
          for group in _shapes(line.split("=", 1)[1].split(f" {op}", 1)[0])
        ]
        found.append([op, max(dims, default=0)])
  return found


def _shapes(text):
  import re

  return re.findall(r"[a-z]+\d*\[([\d,]*)\]", text)


def device_bytes(tree):
  device = jax.devices()[0]
  return sum(
    s.data.nbytes
    for x in jax.tree.leaves(tree)
    for s in x.addressable_shards
    if s.device == device
  )


def on_mesh(case, block):
  """The case on its mesh: ((params, state), compiled step, param bytes/device)."""
  layout, dtype, settings = CASES[case]
  mesh_shape, names, specs = LAYOUTS[layout]
  mesh = jax.make_mesh(mesh_shape, names, axis_types=(AxisType.Auto,) * len(names))
  param_sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  tx = make_tx(settings, block)
  params, grads = trees(dtype)
  params = jax.device_put(params, param_sh)
  grads = [jax.device_put(g, param_sh) for g in grads]
  state_sh = optax_sm3.state_shardings(tx, params, param_sh)
  state = jax.jit(tx.init, out_shardings=state_sh)(params)
  step = (
    jax.jit(
      opt_step(tx),
      in_shardings=(param_sh, state_sh, param_sh),
      out_shardings=(param_sh, state_sh),
    )
    .lower(params, state, grads[0])
    .compile()
  )
  out = train(step, params, state, grads)
  specs_kept = [str(x.sharding.spec) for x in jax.tree.leaves(out[1])] == [
    str(s.spec) for s in jax.tree.leaves(state_sh)
  ]
  return out, step, device_bytes(params), specs_kept


def sharded(case):
  looped, step, param_bytes, specs_kept = on_mesh(case, BLOCK)
  direct, direct_step, _, _ = on_mesh(case, 0)
  reference = one_device(case)
  hlo = step.as_text()
  # The parameters the loop takes (the bias is below its threshold).
  big = [k for k, s in SHAPES.items() if math.prod(s) > 1 << 16]
  return {
    "same_as_direct_on_mesh": same(looped, direct),
    "accumulators_same_as_one_device": same(
      [looped[1][0].accumulators[k] for k in big],
      [reference[1][0].accumulators[k] for k in big],
    ),
    "params_diff_to_one_device": max_diff(looped[0], reference[0]),
    "params_moved": max_diff(reference[0], trees(CASES[case][1])[0]),
    "state_specs_kept": specs_kept,
    "loops": hlo.count(" while("),
    "direct_loops": direct_step.as_text().count(" while("),
    "collectives": collectives(hlo),
    "max_accumulator_elements": max(
      x.size for x in jax.tree.leaves(looped[1][0].accumulators)
    ),
    "temp_bytes": step.memory_analysis().temp_size_in_bytes,
    "direct_temp_bytes": direct_step.memory_analysis().temp_size_in_bytes,
    "param_bytes_per_device": param_bytes,
  }


def explicit_run():
  """Explicit sharding mode: the loop under shard_map on the types' specs."""
  mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
  _, dtype, settings = CASES["2d/bf16"]
  tx = make_tx(settings)
  with jax.set_mesh(mesh):
    param_sh = {k: NamedSharding(mesh, s) for k, s in LAYOUTS["2d"][2].items()}
    params, grads = trees(dtype)
    params = jax.device_put(params, param_sh)
    grads = [jax.device_put(g, param_sh) for g in grads]
    state_sh = optax_sm3.state_shardings(tx, params, param_sh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    types = lambda tree: [str(jax.typeof(x)) for x in jax.tree.leaves(tree)]
    before = types(state)
    step = jax.jit(opt_step(tx)).lower(params, state, grads[0]).compile()
    out = train(step, params, state, grads)
    hlo = step.as_text()
  return {
    "accumulators_same_as_one_device": same(
      out[1][0].accumulators, one_device("2d/bf16")[1][0].accumulators
    ),
    "types_kept": before == types(out[1]),
    "collectives": collectives(hlo),
  }


def transforms_run():
  """jit without shardings, vmap, scan, grad and shard_map, on one parameter.

  Each runs looped on the mesh and direct (``block_size=0``) on one device
  (under shard_map: direct on the mesh, the same per-device semantics), and
  returns ``(accumulators, the rest)``: the accumulators must agree bit for
  bit, the rest (updates, a derivative) to rounding, since XLA may fuse the
  update's arithmetic differently in another program.
  """
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(2)
  gs = rng.normal(size=(3, 512, 256)).astype(np.float32)
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))

  def two_steps(tx, first, second):
    state = tx.init(first)
    _, state = tx.update(first, state)
    updates, state = tx.update(second, state)
    return state.accumulators, updates

  def scanned(tx, seq):
    state = tx.init(seq[0])
    step = lambda s, g: (tx.update(g, s)[1], None)
    return jax.lax.scan(step, state, seq)[0].accumulators, ()

  def grad(tx, g):
    def loss(t):
      accumulators, updates = two_steps(tx, g, g + t * g[::-1])
      return jnp.sum(updates**2) + sum(jnp.sum(a**2) for a in accumulators)

    return (), jax.grad(loss)(1.0)

  def mapped(tx, x):
    # A user's shard_map: each device runs SM3 on its own block of rows.
    return jax.shard_map(
      lambda x: two_steps(tx, x, 2 * x),
      mesh=mesh,
      in_specs=P("x", None),
      out_specs=((P("x"), P("x")), P("x", None)),
    )(x)

  mesh2d = jax.make_mesh((4, 2), ("x", "y"), axis_types=(AxisType.Auto,) * 2)

  def partly_mapped(tx, x):
    # A shard_map over "x" only: "y" stays automatic, and SM3 falls back to
    # the direct form there (XLA gives the partitioner no mesh for it).
    return jax.shard_map(
      lambda x: two_steps(tx, x, 2 * x),
      mesh=mesh2d,
      in_specs=P("x", None),
      out_specs=((P("x"), P()), P("x", None)),
      axis_names={"x"},
      check_vma=False,
    )(x)

  big = rng.normal(size=(8 * 512, 256)).astype(np.float32)
  runs = {
    # No sharding on a multi-device host: one device in the jit.
    "jit": (lambda tx, x: two_steps(tx, x[0], x[1]), gs, gs),
    # An ensemble whose rows are sharded: the batch axis becomes stacked.
    "vmap": (
      lambda tx, x: jax.vmap(lambda y: two_steps(tx, y, 2 * y))(x),
      put(gs, None, "x", None),
      gs,
    ),
    "scan": (scanned, put(gs, None, None, "x"), gs),
    "grad": (grad, put(gs[0], "x", None), gs[0]),
    "shard_map": (mapped, put(big, "x", None), put(big, "x", None)),
    "shard_map/partial": (partly_mapped,)
    + (jax.device_put(big, NamedSharding(mesh2d, P("x", "y"))),) * 2,
  }
  results = {}
  one = jax.devices()[0]
  for name, (fn, x, x_ref) in runs.items():
    looped = jax.jit(functools.partial(fn, optax_sm3.scale_by_sm3(beta=0.5)))
    looped = looped.lower(x).compile()
    direct = jax.jit(
      functools.partial(fn, optax_sm3.scale_by_sm3(beta=0.5, block_size=0))
    )
    if not name.startswith("shard_map"):
      x_ref = jax.device_put(x_ref, one)
    (accumulators, rest), (expected, expected_rest) = looped(x), direct(x_ref)
    results[name] = {
      "accumulators_same": same(accumulators, expected),
      "rest_diff": max_diff(rest, expected_rest) if jax.tree.leaves(rest) else 0.0,
      "loops": " while(" in looped.as_text(),
    }
  return results


def main():
  assert jax.device_count() == 8, jax.devices()
  results = {case: sharded(case) for case in CASES}
  results["explicit"] = explicit_run()
  results["transforms"] = transforms_run()
  print(json.dumps(results))


if __name__ == "__main__":
  import _subprocess  # this script's folder, tests/, is on sys.path

  _subprocess.force_cpu_devices(8)
  main()
