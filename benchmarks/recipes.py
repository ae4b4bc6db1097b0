"""The recipe search: SM3's own knobs on the character-level transformer.

The main benchmark (``python -m benchmarks``) compares optimizers with equal
budgets. This script is the separate, larger search that chose the SM3 recipe
it runs as ``sm3-recipe``: every candidate is tuned and ranked on the
validation split of the Shakespeare character transformer only (the test split
is never read here), then the recipe is applied unchanged to the other
workloads by the main benchmark.

The search is coordinate-wise, in stages; each stage starts from the best
candidate so far that fits the memory budget (optimizer state at most 3% of
Adam's):

* ``adam``: Adam at a constant rate, with a warm-up and a linear cool-down
  over the last 10%, and with warm-up + cosine decay (two warm-up lengths);
  at the end Adam also runs with the recipe's own schedule, and the best of
  these on validation is the tuned Adam the recipe is held against;
* ``beta x schedule``: SM3 without momentum, ``beta`` in {0, 0.9, 0.99, 0.999}
  times three schedules (the authors' quadratic warm-up to a constant rate;
  the same with a linear cool-down over the last 10%; warm-up then cosine
  decay);
* ``warm-up``, ``cool-down``: the best so far with other warm-up lengths, then
  (if it cools down) other cool-down lengths;
* ``covers``: merging small axes into one accumulator (``merge_axes_up_to``),
  which buys per-entry accumulators for small parameters with memory;
* ``heavier``: momentum (heavy-ball, Nesterov, bfloat16 ``mu_dtype``) and
  hybrids through :func:`optax.multi_transform` that keep SM3 without momentum
  on the embeddings and give the dense layers momentum or Adam. These do not
  fit the budget; they say what the memory buys.

Every candidate trains each rate of its grid (5 rates, factor 2 apart) once
with seed 0 (a best rate on the grid's edge is followed outwards, at most two
more rates); its best rate then trains with seeds 1 and 2, and candidates are
ranked by the mean validation loss of the three seeds.

Usage (from the repository root)::

  python -m benchmarks.recipes            # the full search, ~20 min on 2 cores
  python -m benchmarks.recipes --quick    # 100 steps, 3 rates, 1 seed

Writes ``recipes.json`` and ``recipes.md`` under ``--out`` (default
``results/recipes``) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

import optax_sm3
from benchmarks import _optimizers, _report, _runner, _workloads

MEMORY_BUDGET = 0.03  # optimizer state / tuned Adam's state
WORKLOAD = "shakespeare-char"
_EXTEND = 2  # grid extensions when the best rate is on an edge
# Leaves read by a lookup (row-sparse gradients); the rest are dense layers.
EMBEDDINGS = ("embedding", "position")


@dataclasses.dataclass(frozen=True)
class Config:
  """One point of the search.

  Attributes:
    family: ``"adam"``, ``"sm3"`` or a hybrid (``"sm3+sm3"``, ``"sm3+adam"``).
    beta: SM3's second-moment decay.
    schedule: ``"constant"`` (warm-up then constant), ``"cooldown"`` (and a
      linear decay to 0 over the last ``decay`` of the steps) or ``"cosine"``
      (warm-up then cosine decay to 0).
    warmup: warm-up length as a fraction of the steps.
    decay: the cool-down's length as a fraction of the steps.
    momentum: SM3's momentum (on every leaf, or on the dense layers of a
      hybrid).
    nesterov: Nesterov momentum.
    mu_dtype: the momentum's dtype name, or ``None`` for the parameters'.
    merge_axes_up_to: SM3's cover option.
    dense_lr: a hybrid's fixed Adam rate on the dense layers.
  """

  family: str = "sm3"
  beta: float = 0.0
  schedule: str = "constant"
  warmup: float = 0.05
  decay: float = 0.1
  momentum: float = 0.0
  nesterov: bool = False
  mu_dtype: str | None = None
  merge_axes_up_to: int | None = None
  dense_lr: float | None = None

  def label(self) -> str:
    parts = [self.family, f"{self.schedule} w={self.warmup:g}"]
    if self.schedule == "cooldown":
      parts[-1] += f" d={self.decay:g}"
    if self.family != "adam":
      parts.append(f"beta={self.beta:g}")
    if self.momentum:
      parts.append(f"m={self.momentum:g}" + (" nesterov" if self.nesterov else ""))
    if self.mu_dtype:
      parts.append(f"mu={self.mu_dtype}")
    if self.merge_axes_up_to:
      parts.append(f"merge<={self.merge_axes_up_to}")
    if self.dense_lr:
      parts.append(f"dense adam lr={self.dense_lr:g}")
    return " ".join(parts)


# The recipe this search chose (``python -m benchmarks.recipes``, jax 0.10.2):
# ``optax_sm3.sm3_recipe(..., beta=0.9, bias_correction=False)``. The
# library's defaults are the transfer study's choice (``benchmarks.transfer``).
SEARCH_RECIPE = Config(
  beta=0.9, schedule="cooldown", warmup=0.02, decay=0.1, merge_axes_up_to=2048
)


def schedule(config: Config, peak, total_steps: int):
  """The learning-rate schedule of ``config``, peaking at ``peak``."""
  warmup = round(config.warmup * total_steps)
  if config.schedule == "cosine" and warmup:  # optax's linear warm-up
    factor = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, total_steps)
  elif config.schedule == "cosine":
    factor = optax.cosine_decay_schedule(1.0, total_steps)
  else:  # the authors' quadratic warm-up
    decay = config.decay if config.schedule == "cooldown" else 0.0
    factor = optax_sm3.warmup_schedule(
      1.0, total_steps, warmup_fraction=config.warmup, decay_fraction=decay
    )
  return lambda count: peak * factor(count)


def _sm3(config: Config, learning_rate, momentum: float):
  return optax_sm3.sm3(
    learning_rate,
    momentum,
    config.beta,
    nesterov=config.nesterov,
    mu_dtype=config.mu_dtype and jnp.dtype(config.mu_dtype),
    merge_axes_up_to=config.merge_axes_up_to,
  )


def _labels(params):
  return {k: "embeddings" if k in EMBEDDINGS else "dense" for k in params}


def make(config: Config) -> Callable[[object, int], optax.GradientTransformation]:
  """``make(learning_rate, total_steps)`` for the benchmark's trainer."""

  def build(learning_rate, total_steps):
    lr = schedule(config, learning_rate, total_steps)
    if config.family == "adam":
      return optax.adam(lr)
    if config.family == "sm3":
      return _sm3(config, lr, config.momentum)
    tables = _sm3(config, lr, 0.0)
    if config.family == "sm3+sm3":
      dense = _sm3(config, lr, config.momentum)
    elif config.family == "sm3+adam":
      dense = optax.adam(schedule(config, config.dense_lr, total_steps))
    else:
      raise ValueError(f"unknown family {config.family!r}")
    return optax.multi_transform({"embeddings": tables, "dense": dense}, _labels)

  return build


def grid(config: Config, size: int) -> tuple[float, ...]:
  """``size`` rates, factor 2 apart, centred where the family's optimum lies.

  Summed squared gradients (``beta = 0``) shrink the steps over time and want
  rates near 0.1; moving averages and Adam want rates near 3e-3.
  """
  centre = 0.2 if config.family != "adam" and config.beta == 0 else 4e-3
  return tuple(centre * 2.0 ** (i - (size - 1) / 2) for i in range(size))


def _argmin(metrics: dict, default=None):
  finite = {k: m for k, m in metrics.items() if m == m}
  return min(finite, key=finite.get) if finite else default


def tune_rates(
  rates: Sequence[float], metric: Callable[[float], float], extend: int = _EXTEND
) -> dict[float, float]:
  """``metric`` of every rate; a best rate on an edge is followed outwards.

  Args:
    rates: the grid, increasing, factor 2 apart.
    metric: the validation loss of a rate (NaN for a diverged run).
    extend: at most this many rates are added beyond the grid's edges.

  Returns:
    The loss of every rate tried, by rate.
  """
  tuning = {lr: metric(lr) for lr in rates}
  for _ in range(extend):
    best = _argmin(tuning)
    if best is None or min(tuning) < best < max(tuning):
      break
    new = best * 2 if best == max(tuning) else best / 2
    tuning[new] = metric(new)
  return dict(sorted(tuning.items()))


@dataclasses.dataclass
class Search:
  """Runs candidates on the validation split and keeps every result."""

  workload: _workloads.Workload
  steps: int
  grid_size: int
  seeds: int
  progress: Callable[[str], None]
  budget: float = MEMORY_BUDGET
  trainer: Callable[..., _runner.Trainer] = _runner.Trainer
  results: list[dict] = dataclasses.field(default_factory=list)
  adam_state_bytes: int | None = None

  def evaluate(self, stage: str, config: Config) -> dict:
    optimizer = _optimizers.Optimizer(
      config.label(), make(config), grid(config, self.grid_size)
    )
    trainer = self.trainer(self.workload, optimizer, self.steps)
    first = {}

    def seed0(lr):
      first[lr] = trainer.run(lr, 0, "tune")
      self.progress(f"{config.label()} lr={lr:.3g}: {first[lr]['metric']:.4f}")
      return first[lr]["metric"]

    tuning = tune_rates(optimizer.grid, seed0)
    best_lr = _argmin(tuning, default=optimizer.grid[0])
    runs = [first[best_lr]] + [
      trainer.run(best_lr, seed, "tune") for seed in range(1, self.seeds)
    ]
    losses = [r["metric"] for r in runs]
    if config.family == "adam" and self.adam_state_bytes is None:
      self.adam_state_bytes = trainer.state_bytes
    result = {
      "stage": stage,
      "label": config.label(),
      "config": dataclasses.asdict(config),
      "validation": {repr(lr): m for lr, m in tuning.items()},
      "learning_rate": best_lr,
      "valid_mean": statistics.fmean(losses),
      "valid_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
      "valid_seeds": losses,
      "train_losses": runs[0]["losses"],
      "param_bytes": trainer.param_bytes,
      "state_bytes": trainer.state_bytes,
    }
    self.results.append(result)
    return result

  def memory(self, result: dict) -> float:
    return result["state_bytes"] / self.adam_state_bytes

  def best(self, stage_results: Sequence[dict], within_budget: bool = True) -> dict:
    pool = [
      r
      for r in stage_results
      if r["valid_mean"] == r["valid_mean"]
      and (not within_budget or self.memory(r) <= self.budget)
    ]
    if not pool:
      raise RuntimeError(
        f"no finite candidate within {self.budget:.0%} of Adam's state"
      )
    return min(pool, key=lambda r: r["valid_mean"])

  def stage(self, name: str, configs: Sequence[Config]) -> list[dict]:
    return [self.evaluate(name, c) for c in configs]


def run(search: Search, quick: bool = False) -> dict:
  """The staged search; returns the chosen recipes and every result."""
  adam = [
    Config("adam", schedule="constant", warmup=0.0),
    Config("adam", schedule="cooldown"),
    Config("adam", schedule="cosine", warmup=0.05),
    Config("adam", schedule="cosine", warmup=0.1),
  ]
  adam = search.stage("adam", adam[::2] if quick else adam)
  betas = (0.0, 0.9) if quick else (0.0, 0.9, 0.99, 0.999)
  schedules = ("constant", "cooldown") if quick else ("constant", "cooldown", "cosine")
  first = search.stage(
    "beta x schedule", [Config(beta=b, schedule=s) for b in betas for s in schedules]
  )
  best = search.best(first)

  def refine(stage, field, values):
    base = Config(**best["config"])
    variants = [
      dataclasses.replace(base, **{field: v})
      for v in values
      if v != getattr(base, field)
    ]
    return search.best([best, *search.stage(stage, variants)])

  best = refine("warm-up", "warmup", (0.1,) if quick else (0.0, 0.02, 0.1, 0.2))
  if best["config"]["schedule"] == "cooldown":
    best = refine("cool-down", "decay", (0.3,) if quick else (0.2, 0.3, 0.5))
  best = refine("covers", "merge_axes_up_to", (2048,) if quick else (2048, 8192))
  recipe = Config(**best["config"])
  # Adam with the recipe's schedule too, so that no schedule favours SM3.
  same = dataclasses.replace(recipe, family="adam", beta=0.0, merge_axes_up_to=None)
  if same.label() not in {r["label"] for r in adam}:
    adam.append(search.evaluate("adam", same))
  tuned_adam = search.best(adam, within_budget=False)
  heavier = [
    dataclasses.replace(recipe, momentum=0.9),
    dataclasses.replace(recipe, momentum=0.9, nesterov=True),
    dataclasses.replace(recipe, momentum=0.9, mu_dtype="bfloat16"),
    dataclasses.replace(recipe, family="sm3+sm3", momentum=0.9),
    dataclasses.replace(
      recipe, family="sm3+adam", dense_lr=tuned_adam["learning_rate"]
    ),
  ]
  if quick:
    heavier = heavier[:1] + heavier[-1:]
  heavy = search.stage("heavier", heavier)
  return {
    "tuned_adam": tuned_adam["label"],
    "recipe": best["label"],
    "recipe_config": best["config"],
    "best_heavier": search.best(heavy, within_budget=False)["label"],
  }


def markdown(report: dict) -> str:
  """The results as Markdown: one table per stage, then the choice."""
  adam = next(r for r in report["results"] if r["label"] == report["tuned_adam"])
  lines = [
    f"Recipe search on `{WORKLOAD}` (validation split, {report['steps']} steps, "
    f"grid of {report['grid_size']} rates, best rate x {report['seeds']} seeds; "
    f"{report['wall_s']:.0f} s wall). Tuned Adam: {report['tuned_adam']}, "
    f"validation loss {adam['valid_mean']:.4f}.",
    "",
    "| stage | candidate | rate | validation loss | vs tuned Adam | state | "
    "state / Adam's |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in report["results"]:
    gap = r["valid_mean"] / adam["valid_mean"] - 1
    memory = r["state_bytes"] / adam["state_bytes"]
    lines.append(
      f"| {r['stage']} | {r['label']} | {r['learning_rate']:.3g} | "
      f"{r['valid_mean']:.4f} ± {r['valid_std']:.4f} | {gap:+.2%} | "
      f"{_report.format_bytes(r['state_bytes'])} | {memory:.2%} |"
    )
  lines += [
    "",
    f"Recipe (best within {report['memory_budget']:.0%} of Adam's state): {report['recipe']}",
    f"Best heavier candidate: {report['best_heavier']}",
    "`optax_sm3.sm3_recipe(..., beta=0.9, bias_correction=False)` is this recipe: "
    + ("yes" if report["recipe"] == SEARCH_RECIPE.label() else "NO"),
  ]
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.recipes",
    description="SM3 recipe search on the Shakespeare character transformer.",
  )
  parser.add_argument("--quick", action="store_true", help="a short smoke run")
  parser.add_argument(
    "--out", type=pathlib.Path, default=pathlib.Path("results/recipes")
  )
  parser.add_argument("--no-progress", action="store_true")
  return parser.parse_args(argv)


def main(argv=None, budget: float = MEMORY_BUDGET, **sizes) -> dict:
  """Runs the search (``budget`` and ``sizes`` are for tests of a tiny model)."""
  args = parse_args(argv)
  workload = _workloads.build(WORKLOAD, **sizes)
  steps = workload.steps // 4 if args.quick else workload.steps
  grid_size, seeds = (3, 1) if args.quick else (5, 3)

  def progress(text):
    if not args.no_progress:
      print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

  start = time.perf_counter()
  search = Search(workload, steps, grid_size, seeds, progress, budget)
  chosen = run(search, quick=args.quick)
  report = {
    "command": " ".join(["python -m benchmarks.recipes", *(argv or sys.argv[1:])]),
    "workload": WORKLOAD,
    "steps": steps,
    "grid_size": grid_size,
    "seeds": seeds,
    "memory_budget": budget,
    "jax": jax.__version__,
    **chosen,
    "results": search.results,
    "wall_s": time.perf_counter() - start,
  }
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "recipes.json").write_text(json.dumps(report, indent=1))
  text = markdown(report)
  (args.out / "recipes.md").write_text(text + "\n")
  print(text)
  return report


if __name__ == "__main__":
  main()
