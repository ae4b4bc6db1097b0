"""Optimizer state per device with the parameters sharded over 8 CPU devices.

Reproduces the README's "Scaling out" table::

  python examples/sharded_state_memory.py

It asks XLA for 8 host (CPU) devices itself, through
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, so it runs on any
machine. The model: an embedding of 32768 x 512 split by rows, a 512 x 2048
kernel split by columns and its (2048,) bias, split like the kernel's columns.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sm3


def per_device_bytes(tree) -> int:
  """Bytes held by the first device (every device holds the same here)."""
  device = jax.devices()[0]
  return sum(
    shard.data.nbytes
    for leaf in jax.tree.leaves(tree)
    for shard in leaf.addressable_shards
    if shard.device == device
  )


def main() -> None:
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  params = {
    "embed": jnp.zeros((32768, 512)),
    "kernel": jnp.zeros((512, 2048)),
    "bias": jnp.zeros((2048,)),
  }
  specs = {"embed": P("model", None), "kernel": P(None, "model"), "bias": P("model")}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  params = jax.device_put(params, shardings)
  optimizers = {
    "`sm3`, momentum=0": optax_sm3.sm3(0.1, momentum=0.0),
    "`sm3`, momentum=0.9": optax_sm3.sm3(0.1, momentum=0.9),
    "`optax.adam`": optax.adam(1e-3),
  }
  print(
    f"{len(jax.devices())} devices; parameters {sum(x.nbytes for x in jax.tree.leaves(params)):,} B"
  )
  print("| optimizer | state per device | state unsharded |")
  print("|---|---:|---:|")
  for name, tx in optimizers.items():
    state_shardings = optax_sm3.state_shardings(tx, params, shardings)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    print(f"| {name} | {per_device_bytes(state):,} B | {total:,} B |")


if __name__ == "__main__":
  main()
