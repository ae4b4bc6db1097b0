"""The protocol: tune each optimizer's rate on validation, then run seeds on test.

Every rate of an optimizer's grid trains once (seed 0) without the validation
rows; the best then trains on the whole training split with each seed, scored
on the test split. A run is compiled once per (workload, optimizer): the rate,
the seed and the usable rows are arguments of a ``lax.scan`` of ``chunk`` steps.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sm3
from benchmarks import _optimizers, _workloads

_CHUNKS = (100, 50, 40, 25, 20, 10, 5, 4, 2, 1)


def chunk_size(steps: int) -> int:
  """The largest of a few chunk lengths (at most 100) that divides ``steps``."""
  return next(c for c in _CHUNKS if steps % c == 0)


def subgrid(grid: Sequence[float], size: int) -> tuple[float, ...]:
  """The ``size`` middle values of ``grid`` (all of it if ``size`` is larger)."""
  size = min(size, len(grid))
  start = (len(grid) - size) // 2
  return tuple(grid[start : start + size])


def tree_bytes(tree) -> int:
  """Total bytes of the array leaves of ``tree`` (shapes or arrays)."""
  return int(
    sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
  )


class Trainer:
  """One compiled training loop for a workload and an optimizer; ``polyak`` also
  scores the averaged parameters, ``sparse`` trains ``tables`` row-sparsely."""

  def __init__(
    self,
    workload: _workloads.Workload,
    optimizer: _optimizers.Optimizer,
    steps: int,
    polyak: optax.GradientTransformation | None = None,
    *,
    sparse: bool = False,
  ):
    self.workload = workload
    self.polyak = polyak
    self.steps = steps
    sparse = sparse and workload.tables is not None and polyak is None
    self.path = "sparse" if sparse else "dense"
    self.chunk = chunk_size(steps)
    self.train = {k: jnp.asarray(v) for k, v in workload.train.items()}
    size = len(next(iter(workload.train.values())))
    self.sizes = {"tune": size - workload.num_valid, "final": size}

    def make(lr):
      opt = optimizer.make(lr, steps)
      if self.path == "sparse":
        return optax_sm3.sparse_tables(opt, tables=workload.tables)
      return opt if polyak is None else optax.chain(opt, polyak)

    def init(key, lr):
      params = workload.init(key)
      return params, make(lr).init(params)

    def run_chunk(params, state, key, lr, train):
      opt = make(lr)

      def step(carry, _):
        params, state, key = carry
        key, batch_key = jax.random.split(key)
        batch = workload.sample(batch_key, train)
        if self.path == "sparse":
          loss, grads = opt.value_and_grad(workload.loss)(params, state, batch)
          params, state = opt.step(params, grads, state)
          return (params, state, key), loss
        loss, grads = jax.value_and_grad(workload.loss)(params, batch)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state, key), loss

      (params, state, key), losses = jax.lax.scan(
        step, (params, state, key), None, length=self.chunk
      )
      return params, state, key, losses

    def current(params, state, lr):
      if self.path == "sparse":  # the tables' pending rows written
        return make(lr).sync(params, state)[0]
      return params

    self._init = jax.jit(init)
    self._run_chunk = jax.jit(run_chunk, donate_argnums=(0, 1))
    self._current = jax.jit(current)
    self._evaluate = jax.jit(workload.evaluate)
    self._compiled = None
    shapes = jax.eval_shape(init, jax.random.key(0), 1.0)
    self.param_bytes = tree_bytes(shapes[0])
    self.polyak_bytes = 0 if polyak is None else tree_bytes(shapes[1][1])
    self.state_bytes = tree_bytes(shapes[1]) - self.polyak_bytes

  def run(self, lr: float, seed: int, split: str) -> dict:
    """Trains once, scored on ``split`` (``"tune"``: validation; ``"final"``: test):
    the ``metric`` (and ``polyak_metric``), each chunk's loss, the ``step_ms``."""
    key = jax.random.key(seed)
    init_key, key = jax.random.split(key)
    lr = jnp.float32(lr)
    params, state = self._init(init_key, lr)
    train = dict(self.train, pool=jnp.int32(self.sizes[split]))
    if self._compiled is None:
      self._compiled = self._run_chunk.lower(params, state, key, lr, train).compile()
    losses, times = [], []
    for _ in range(self.steps // self.chunk):
      start = time.perf_counter()
      params, state, key, chunk_losses = self._compiled(params, state, key, lr, train)
      chunk_losses = np.asarray(chunk_losses)  # waits for the chunk
      times.append(time.perf_counter() - start)
      losses.append(float(chunk_losses.mean()))
    data = self.workload.valid if split == "tune" else self.workload.test
    params = self._current(params, state, lr)
    out = {
      "metric": float(self._evaluate(params, data)),
      "losses": losses,
      "step_ms": 1e3 * statistics.median(times) / self.chunk,
      "path": self.path,
    }
    if self.polyak is not None:
      average = optax_sm3.polyak_params(state)
      average = jax.tree.map(lambda a, p: a.astype(p.dtype), average, params)
      out["polyak_metric"] = float(self._evaluate(average, data))
    return out


def run_workload(
  workload: _workloads.Workload,
  optimizers: Sequence[_optimizers.Optimizer],
  *,
  steps: int,
  seeds: int,
  grid_size: int,
  progress: Callable[[str], None] = lambda _: None,
) -> dict:
  """The protocol on one workload, each optimizer at the ``grid_size`` middle
  rates of its grid; ``progress(label)`` after every run. JSON-ready."""
  out = {
    "metric": workload.metric,
    "higher_is_better": workload.higher_is_better,
    "steps": steps,
    "chunk": chunk_size(steps),
    "optimizers": {},
  }
  for optimizer in optimizers:
    trainer = Trainer(workload, optimizer, steps)
    out["param_bytes"] = trainer.param_bytes
    tuning = {}
    for lr in subgrid(optimizer.grid, grid_size):
      tuning[lr] = trainer.run(lr, 0, "tune")["metric"]
      progress(f"{workload.name} {optimizer.name} lr={lr:g}")
    # The best finite metric (the first of equals); the first rate if none is.
    sign = -1 if workload.higher_is_better else 1
    finite = [lr for lr, m in tuning.items() if not math.isnan(m)] or list(tuning)
    best_lr = min(finite, key=lambda lr: sign * tuning[lr])
    runs = []
    for seed in range(seeds):
      runs.append({"seed": seed, **trainer.run(best_lr, seed, "final")})
      progress(f"{workload.name} {optimizer.name} seed={seed}")
    metrics = [r["metric"] for r in runs]
    out["optimizers"][optimizer.name] = {
      "validation": {repr(lr): m for lr, m in tuning.items()},
      "learning_rate": best_lr,
      "state_bytes": trainer.state_bytes,
      "state_ratio": trainer.state_bytes / trainer.param_bytes,
      "metric_mean": float(np.mean(metrics)),
      "metric_std": float(np.std(metrics, ddof=1)) if len(metrics) > 1 else 0.0,
      "step_ms": float(np.median([r["step_ms"] for r in runs])),
      "runs": runs,
    }
  return out
