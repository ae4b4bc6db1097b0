"""Multi-process training with SM3 on JAX's own distributed runtime.

Starts two local processes that join one JAX cluster with
``jax.distributed.initialize`` (coordinator on 127.0.0.1, a free port picked
at run time, CPU collectives), four CPU devices each. Together they build one
global ``(data=4, model=2)`` mesh over the eight devices and train a small
Flax model with :func:`optax_sm3.sm3`: the batch is split along ``data``, the
embedding table's rows along ``model``, and the optimizer's state follows the
parameters through :func:`optax_sm3.state_shardings`. The launcher trains the
same model in a single process on one device meanwhile, and checks that both
give the same parameters (to float rounding).

Run it as a script; it starts, waits for and cleans up its processes itself,
and gives up after ``--timeout`` seconds::

  python examples/multiprocess_train.py --steps 5

Exit status 0 means the multi-process run matched the single-process one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
VOCAB, SEQ, FEATURES, HIDDEN, CLASSES = 1024, 8, 16, 32, 8
GLOBAL_BATCH = 32


def batch(step):
  """The global batch of ``step``, the same in every process."""
  import numpy as np

  rng = np.random.default_rng(step)
  tokens = rng.integers(0, VOCAB, (GLOBAL_BATCH, SEQ)).astype(np.int32)
  labels = (tokens.sum(axis=1) % CLASSES).astype(np.int32)
  return tokens, labels


def build():
  """The model, its loss, the optimizer and a step function."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  import optax_sm3

  class Model(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      h = nn.Embed(VOCAB, FEATURES, name="embed")(tokens).mean(axis=1)
      h = nn.relu(nn.Dense(HIDDEN, name="hidden")(h))
      return nn.Dense(CLASSES, name="out")(h)

  model = Model()
  tx = optax_sm3.sm3(0.05, momentum=0.9)

  def loss_fn(params, tokens, labels):
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(params, state, tokens, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, labels)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  def init(key):
    return model.init(key, jnp.zeros((1, SEQ), jnp.int32))["params"]

  return init, tx, step


def flat(params):
  import jax
  import numpy as np

  return {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }


def reference(steps):
  """Single process, single device: the result to match."""
  import jax

  init, tx, step = build()
  params = init(jax.random.key(0))
  state = tx.init(params)
  step = jax.jit(step)
  losses = []
  for i in range(steps):
    params, state, loss = step(params, state, *batch(i))
    losses.append(float(loss))
  return flat(params), losses


def worker(process_id, port, steps, out):
  """One of the cluster's processes."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import optax_sm3

  with joined(process_id, port):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    init, tx, step = build()
    key = jax.random.key(0)
    abstract = jax.eval_shape(init, key)
    # Data parallel everywhere, plus the embedding's rows split over `model`.
    param_shardings = jax.tree_util.tree_map_with_path(
      lambda path, _: NamedSharding(
        mesh, P("model", None) if "embed" in jax.tree_util.keystr(path) else P()
      ),
      abstract,
    )
    state_shardings = optax_sm3.state_shardings(tx, abstract, param_shardings)
    data = NamedSharding(mesh, P("data"))
    params = jax.jit(init, out_shardings=param_shardings)(key)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    step = jax.jit(
      step,
      in_shardings=(param_shardings, state_shardings, data, data),
      out_shardings=(param_shardings, state_shardings, NamedSharding(mesh, P())),
    )
    losses = []
    for i in range(steps):
      tokens, labels = batch(i)
      tokens, labels = (
        jax.make_array_from_callback(x.shape, data, lambda index, x=x: x[index])
        for x in (tokens, labels)
      )
      params, state, loss = step(params, state, tokens, labels)
      losses.append(float(loss))
    per_device = {}
    for leaf in jax.tree.leaves(state):
      for shard in leaf.addressable_shards:
        per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    state_bytes = [
      max(per_device.values()),
      sum(x.nbytes for x in jax.tree.leaves(state)),
    ]
    gathered = multihost_utils.process_allgather(params, tiled=True)
    if process_id == 0:
      np.savez(
        out,
        losses=np.asarray(losses),
        state_bytes=np.asarray(state_bytes),
        **flat(gathered),
      )


@contextlib.contextmanager
def joined(process_id, port):
  """This process as member ``process_id`` of the cluster, for the ``with`` body."""
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=NUM_PROCESSES,
    process_id=process_id,
    initialization_timeout=60,
  )
  try:
    assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES
    yield
  finally:
    jax.distributed.shutdown()


def free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_cluster(script, args, timeout, meanwhile):
  """Runs ``script`` as the cluster's processes, and ``meanwhile()`` here.

  Each process runs ``script --worker I --port PORT --out FILE *args``;
  process 0 saves its results to FILE with ``np.savez``. Returns
  ``meanwhile()``'s result and those arrays as a dict, or None in place of
  the dict when a process failed or ran past ``timeout`` seconds (its log
  goes to stderr); no process outlives the call.
  """
  import numpy as np

  port = free_port()
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
  )
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.npz")
    logs = [open(os.path.join(tmp, f"log{i}.txt"), "w+") for i in range(NUM_PROCESSES)]
    procs = []
    try:
      for i in range(NUM_PROCESSES):
        command = [sys.executable, os.path.abspath(script), "--worker", str(i)]
        command += ["--port", str(port), "--out", out, *args]
        procs.append(
          subprocess.Popen(command, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
        )
      expected = meanwhile()
      deadline = time.monotonic() + timeout
      for proc in procs:
        try:
          proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
          print(f"timed out after {timeout} s", file=sys.stderr)
          break
    finally:
      for proc in procs:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    failed = [i for i, proc in enumerate(procs) if proc.returncode != 0]
    for i in failed:
      logs[i].seek(0)
      print(f"--- process {i} (exit {procs[i].returncode}):", file=sys.stderr)
      print(logs[i].read()[-4000:], file=sys.stderr)
    for log in logs:
      log.close()
    if failed:
      return expected, None
    with np.load(out) as result:
      return expected, {k: result[k] for k in result.files}


def launch(steps, timeout):
  """Runs the cluster and the reference; returns the exit status."""
  import numpy as np

  (expected, expected_losses), got = run_cluster(
    __file__, ["--steps", str(steps)], timeout, lambda: reference(steps)
  )
  if got is None:
    return 1
  losses = got.pop("losses")
  per_device, replicated = got.pop("state_bytes")
  diff = max(float(np.max(np.abs(got[k] - v))) for k, v in expected.items())
  loss_diff = float(np.max(np.abs(losses - np.asarray(expected_losses))))
  same = sorted(got) == sorted(expected) and diff < 1e-5 and loss_diff < 1e-5
  print(
    f"losses (2 processes x {LOCAL_DEVICES} devices): "
    + ", ".join(f"{x:.4f}" for x in losses)
  )
  print(
    "losses (1 process, 1 device):       "
    + ", ".join(f"{x:.4f}" for x in expected_losses)
  )
  print(f"max |param difference| = {diff:.2e}, max |loss difference| = {loss_diff:.2e}")
  print(
    f"optimizer state: {per_device} bytes per device "
    f"({replicated} bytes if every device held all of it)"
  )
  print("MATCH" if same else "MISMATCH")
  return 0 if same else 1


def parse_args(description, timeout, more=()):
  """The launcher's options (``more``: ``(flags, kwargs)`` pairs) and the workers'."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--timeout", type=float, default=timeout)
  for flags, kwargs in more:
    parser.add_argument(*flags, **kwargs)
  parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  if args.timeout <= 0:
    parser.error("--timeout must be > 0")
  return args


def main():
  args = parse_args(__doc__.splitlines()[0], timeout=180.0)
  if args.worker is not None:
    worker(args.worker, args.port, args.steps, args.out)
    return 0
  return launch(args.steps, args.timeout)


if __name__ == "__main__":
  sys.exit(main())
