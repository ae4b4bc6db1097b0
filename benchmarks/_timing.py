"""What the step benchmarks share: timing loops and a measurement in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import optax


def carried(jitted, *carry, out: int = -1):
  """``step(*args)`` that calls ``jitted(*carry, *args)``, keeps the new carry and
  returns the one more value ``jitted`` returns at position ``out``."""
  carry = list(carry)

  def step(*args):
    new = list(jitted(*carry, *args))
    value = new.pop(out)
    carry[:] = new
    return value

  return step


def train_step(tx):
  """``step(params, state, grads) -> (params, state)``: one update of ``tx``."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def step_seconds(step, data, untimed: int = 1) -> list[float]:
  """Seconds of each ``step(*batch)`` over ``data``, all but the first ``untimed``."""
  times = []
  for i, batch in enumerate(data):
    start = time.perf_counter()
    jax.block_until_ready(step(*batch))
    if i >= untimed:
      times.append(time.perf_counter() - start)
  return times


def compiled_loop(fn, args, donate=(), **jit):
  """``fn`` compiled for ``args``, and ``run(calls)``: seconds per call of ``calls``
  calls (waited for at the end), each call's outputs replacing the donated
  arguments, in order."""
  compiled = jax.jit(fn, donate_argnums=donate, **jit).lower(*args).compile()
  args = list(args)

  def run(calls):
    start = time.perf_counter()
    for _ in range(calls):
      out = compiled(*args)
      for position, index in enumerate(donate):
        args[index] = out[position]
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls

  return compiled, run


def in_child(module: str, *argv: str, devices: int = 1) -> dict:
  """Runs ``python -m module *argv`` (on ``devices`` CPU devices) and reads its last
  line of output as JSON; ``RuntimeError`` with its stderr's end if it fails."""
  env = dict(os.environ)
  if devices > 1:
    env["JAX_PLATFORMS"] = "cpu"
    flag = f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + flag
  argv = [sys.executable, "-m", module, *argv]
  done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
  if done.returncode != 0:
    raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])
