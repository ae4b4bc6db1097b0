"""The transfer studies' candidates, their resumable record of runs, and the lever study.

A :class:`Study` remembers every run of a :class:`Candidate` (an optimizer
setting), so that an interrupted study resumes. The lever study
(``python -m benchmarks.transfer --levers``; the recipe guide gives its
protocol) chooses, for each held-out workload of :data:`WORKLOADS` and each
memory budget, the setting with the smallest worst validation gap to the tuned
Adam on the others. Gaps are relative (loss, or error rate, over Adam's minus
1); positive is worse.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import optax

import optax_sm3
from benchmarks import _optimizers, _report, _runner, _workloads

POLYAK_DECAY = 0.95
SEEDS = 3


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One optimizer setting of the study.

  Attributes:
    name: the label in tables.
    family: ``"sm3"`` or ``"adam"``.
    beta: SM3's second-moment decay, or ``"rising"`` for Adafactor's
      ``1 - t**-0.8``.
    bias_correction: SM3's ``bias_correction``.
    schedule: ``"constant"``, ``"cooldown"`` or ``"cosine"`` (see
      :meth:`schedule_fn`).
    warmup: warm-up length as a fraction of the steps.
    decay: the cool-down's length as a fraction of the steps.
    momentum: SM3's momentum (0: no buffer).
    mu_dtype: the momentum's dtype name.
    merge_axes_up_to: SM3's cover option.
    clip_rms: clip each parameter's update to this RMS (Adafactor's update
      clipping, :func:`optax.clip_by_block_rms`), or ``None``.
    param_scale: scale each update by its parameter's RMS (Adafactor's
      relative step, :func:`optax.scale_by_param_block_rms`).
    factory: where the setting is a library optimizer, its
      ``factory(learning_rate, total_steps)``, which ``make`` calls (the
      sparse path takes only optimizers that ``optax_sm3`` made); the
      fields above still describe it.
  """

  name: str
  family: str = "sm3"
  beta: float | str = 0.9
  bias_correction: bool = False
  schedule: str = "cooldown"
  warmup: float = 0.02
  decay: float = 0.1
  momentum: float = 0.0
  mu_dtype: str | None = None
  merge_axes_up_to: int | None = 2048
  clip_rms: float | None = None
  param_scale: bool = False
  factory: Callable[[Any, Any], optax.GradientTransformation] | None = None

  def schedule_fn(self, peak, total_steps: int):
    """The rate at each step: a quadratic warm-up, then ``peak`` (``"constant"``),
    cooling down linearly over ``decay`` (``"cooldown"``); or optax's warm-up
    and cosine decay (``"cosine"``)."""
    warmup = round(self.warmup * total_steps)
    if self.schedule == "cosine" and warmup:
      factor = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, total_steps)
    elif self.schedule == "cosine":
      factor = optax.cosine_decay_schedule(1.0, total_steps)
    else:
      decay = self.decay if self.schedule == "cooldown" else 0.0
      factor = optax_sm3.warmup_schedule(
        1.0, total_steps, warmup_fraction=self.warmup, decay_fraction=decay
      )
    return lambda count: peak * factor(count)

  def make(self, learning_rate, total_steps) -> optax.GradientTransformation:
    if self.factory is not None:
      return self.factory(learning_rate, total_steps)
    lr = self.schedule_fn(learning_rate, total_steps)
    if self.family == "adam":
      return optax.adam(lr)
    beta = _rising if self.beta == "rising" else self.beta
    parts = [
      optax_sm3.scale_by_sm3(
        beta=beta,
        bias_correction=self.bias_correction,
        merge_axes_up_to=self.merge_axes_up_to,
      )
    ]
    if self.clip_rms is not None:
      parts.append(optax.clip_by_block_rms(self.clip_rms))
    if self.param_scale:
      parts.append(optax.scale_by_param_block_rms())
    if self.momentum:
      parts.append(
        optax_sm3.scale_by_momentum(
          self.momentum, mu_dtype=self.mu_dtype and jnp.dtype(self.mu_dtype)
        )
      )
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)

  def grid(self, size: int) -> tuple[float, ...]:
    """``size`` rates, factor 2 apart, around where this setting's optimum lies."""
    if self.family == "sm3" and self.beta == 0:
      centre = 0.2  # sums shrink the steps over time
    elif self.param_scale:
      centre = 0.03  # a step relative to the parameters' RMS
    else:
      centre = 4e-3
    return tuple(centre * 2.0 ** (i - (size - 1) / 2) for i in range(size))


def _rising(count):
  return 1.0 - (count + 1.0) ** -0.8


# The base every lever changes, and the setting every fold chose:
# ``sm3_recipe``'s second-moment settings at this study's 10% cool-down.
BASE = Candidate("beta 0.9")
RECIPE = Candidate(
  "beta 0.99 + bias correction",
  beta=0.99,
  bias_correction=True,
  decay=0.1,
  factory=functools.partial(optax_sm3.sm3_recipe, decay_fraction=0.1),
)
CANDIDATES = (
  Candidate("adam constant", "adam", schedule="constant", warmup=0.0),
  Candidate("adam warm-up + cosine", "adam", schedule="cosine", warmup=0.05),
  Candidate("adam warm-up/stable/cool-down", "adam"),
  Candidate("paper (beta 0, constant)", beta=0.0, schedule="constant",
            merge_axes_up_to=None),
  BASE,
  RECIPE,
  Candidate("rising beta", beta="rising"),
  Candidate("RMS update clipping 1.0", clip_rms=1.0),
  Candidate("per-shape rate (parameter RMS)", param_scale=True),
  Candidate("cool-down 30%", decay=0.3),
  Candidate("no cool-down (constant)", schedule="constant"),
  Candidate("bf16 momentum 0.9", momentum=0.9, mu_dtype="bfloat16"),
)  # fmt: skip
POLYAK = " +polyak"


def _gap(workload: _workloads.Workload, metric: float, adam: float) -> float:
  """The relative gap to Adam; positive is worse (NaN for a diverged run)."""
  if workload.higher_is_better:
    metric, adam = 1.0 - metric, 1.0 - adam
  return metric / adam - 1.0


def _nan_max(values) -> float:
  values = list(values)
  return math.inf if any(v != v for v in values) else max(values)


@dataclasses.dataclass
class Study:
  """Runs and remembers every training run; ``record`` is saved after each."""

  steps_scale: float
  grid_size: int
  extend: int
  record: dict
  save: Callable[[], None]
  progress: Callable[[str], None]
  polyak: bool = True
  _trainers: dict = dataclasses.field(default_factory=dict)
  _built: dict = dataclasses.field(default_factory=dict)

  def workload(self, name: str) -> _workloads.Workload:
    if name not in self._built:
      self._built[name] = _workloads.build(name)
    return self._built[name]

  def steps(self, name: str, factor: float = 1.0) -> int:
    return max(2, round(self.workload(name).steps * self.steps_scale * factor))

  def trainer(self, name: str, candidate: Candidate, steps: int) -> _runner.Trainer:
    key = (name, candidate.name, steps)
    if key not in self._trainers:
      self._trainers.clear()  # one compiled loop at a time
      sm3 = candidate.family == "sm3"
      polyak = optax_sm3.polyak_averaging(POLYAK_DECAY) if sm3 and self.polyak else None
      optimizer = _optimizers.Optimizer(candidate.name, candidate.make, ())
      self._trainers[key] = _runner.Trainer(
        self.workload(name), optimizer, steps, polyak, sparse=sm3
      )
    return self._trainers[key]

  def run(self, name, candidate, lr, seed, split, factor=1.0) -> dict:
    steps = self.steps(name, factor)
    key = f"{name}|{candidate.name}|{steps}|{lr!r}|{seed}|{split}"
    if key not in self.record["runs"]:
      trainer = self.trainer(name, candidate, steps)
      out = trainer.run(lr, seed, split)
      out.update(
        state_bytes=trainer.state_bytes,
        polyak_bytes=trainer.polyak_bytes,
        param_bytes=trainer.param_bytes,
      )
      self.record["runs"][key] = out
      self.save()
      self.progress(f"{key}: {out['metric']:.4f}")
    return self.record["runs"][key]

  def test(self, name, candidate, lr, seeds, factor=1.0, polyak=False) -> dict:
    """Seeds ``0 .. seeds - 1`` on the test split (``polyak``: scored with the
    average): the metric's mean and spread."""
    runs = [self.run(name, candidate, lr, s, "final", factor) for s in range(seeds)]
    metrics = [r["polyak_metric" if polyak else "metric"] for r in runs]
    return {
      "learning_rate": lr,
      "mean": statistics.fmean(metrics),
      "std": statistics.stdev(metrics) if len(metrics) > 1 else 0.0,
      "metrics": metrics,
      "losses": runs[0]["losses"],
      "state_bytes": runs[0]["state_bytes"],
      "path": runs[0].get("path", "dense"),
    }

  def tune(self, name: str, candidate: Candidate, factor: float = 1.0) -> dict:
    """Validation metric by rate (seed 0), the grid followed past a best edge."""
    return self.sweep(name, candidate, candidate.grid(self.grid_size), factor)

  def sweep(
    self, name: str, candidate: Candidate, rates: Sequence[float], factor: float = 1.0
  ) -> dict:
    """Validation runs (seed 0) at ``rates``, followed past a best edge."""
    higher = self.workload(name).higher_is_better
    rates = list(rates)
    metrics = {}
    for _ in range(self.extend + 1):
      for lr in rates:
        if lr not in metrics:
          metrics[lr] = self.run(name, candidate, lr, 0, "tune", factor)
      metric, best = _score(metrics, False, higher)
      if metric != metric or min(metrics) < best < max(metrics):
        break
      rates = [best * 2 if best == max(metrics) else best / 2]
    return metrics


def _score(runs: dict, polyak: bool, higher: bool) -> tuple[float, float]:
  """The best rate's validation metric (plain or averaged) and the rate."""
  field = "polyak_metric" if polyak else "metric"
  finite = {lr: r[field] for lr, r in runs.items() if r[field] == r[field]}
  if not finite:
    return math.nan, min(runs)
  best = (max if higher else min)(finite, key=finite.get)
  return finite[best], best


def _mean_std(metric: str, test: dict) -> str:
  fmt = "{:.2%}" if "accuracy" in metric else "{:.4f}"
  return f"{fmt.format(test['mean'])} ± {fmt.format(test['std'])}"


def gap_table(title: str, first: str, names, rows, *extra: str) -> list[str]:
  """``title`` over a table of ``rows``, ``(label, gaps, *cells)``: a column per
  workload of ``names``, the worst gap, then ``cells`` under ``extra``."""
  body = [
    [label, *(f"{g:+.2%}" for g in gaps), f"{_nan_max(gaps):+.2%}", *cells]
    for label, gaps, *cells in rows
  ]
  align = "rl"[bool(extra)] + "r" * (len(names) + 1 + len(extra))
  return ["", title, "", *_report.table([first, *names, "worst", *extra], body, align)]


# The lever study (``python -m benchmarks.transfer --levers``).

WORKLOADS = ("shakespeare-char", "code-char", "wiki-word", "cmudict-syllables")
BUDGETS = (0.03, 0.30)  # optimizer state / Adam's


def tuned_table(study: Study, names: Sequence[str], factor: float = 1.0) -> dict:
  """Per workload and candidate (and ``+polyak``): validation metric, rate, state."""
  table = {}
  for name in names:
    workload = study.workload(name)
    rows = {}
    for candidate in CANDIDATES:
      runs = study.tune(name, candidate, factor)
      first = next(iter(runs.values()))
      for polyak in (False, True) if candidate.family == "sm3" else (False,):
        metric, lr = _score(runs, polyak, workload.higher_is_better)
        rows[candidate.name + (POLYAK if polyak else "")] = {
          "candidate": candidate.name,
          "polyak": polyak,
          "valid": metric,
          "learning_rate": lr,
          "state_bytes": first["state_bytes"]
          + (first["polyak_bytes"] if polyak else 0),
        }
    adam = {k: {"metric": r["valid"]} for k, r in rows.items() if k.startswith("adam")}
    best_adam = _score(adam, False, workload.higher_is_better)[1]
    adam_bytes = rows[best_adam]["state_bytes"]
    for row in rows.values():
      row["gap"] = _gap(workload, row["valid"], rows[best_adam]["valid"])
      row["memory"] = row["state_bytes"] / adam_bytes
    table[name] = {"tuned_adam": best_adam, "rows": rows}
  return table


def choose(table: dict, held_out: str, budget: float) -> str:
  """The SM3 setting with the smallest worst gap on the other workloads."""
  others = [n for n in table if n != held_out]
  pool = [
    k
    for k, r in table[held_out]["rows"].items()
    if not k.startswith("adam")
    and all(table[n]["rows"][k]["memory"] <= budget for n in table)
  ]
  return min(pool, key=lambda k: _nan_max(table[n]["rows"][k]["gap"] for n in others))


def _test(study: Study, name: str, row: dict, factor: float = 1.0) -> dict:
  candidate = next(c for c in CANDIDATES if c.name == row["candidate"])
  lr, polyak = row["learning_rate"], row["polyak"]
  return study.test(name, candidate, lr, SEEDS, factor, polyak)


def leave_one_out(study: Study, table: dict) -> list[dict]:
  """For each budget and held-out workload: the choice and its test figures."""
  out = []
  for budget in BUDGETS:
    for name in table:
      chosen = choose(table, name, budget)
      rows = table[name]["rows"]
      adam_name = table[name]["tuned_adam"]
      sm3 = _test(study, name, rows[chosen])
      adam = _test(study, name, rows[adam_name])
      workload = study.workload(name)
      out.append({
        "budget": budget,
        "workload": name,
        "metric": workload.metric,
        "chosen": chosen,
        "chosen_lr": rows[chosen]["learning_rate"],
        "adam": adam_name,
        "adam_lr": rows[adam_name]["learning_rate"],
        "sm3": sm3,
        "adam_test": adam,
        "gap": _gap(workload, sm3["mean"], adam["mean"]),
        "memory": rows[chosen]["memory"],
      })  # fmt: skip
  return out


def long_runs(study: Study, table: dict, factor: float) -> list[dict]:
  """The recipe, its base and the tuned Adam on the first workload, at 1x and
  ``factor`` x (the rate re-tuned between the 1x rate and half of it)."""
  name = next(iter(table))
  workload = study.workload(name)
  rows = table[name]["rows"]
  out = []
  for key in (RECIPE.name, BASE.name, table[name]["tuned_adam"]):
    candidate = next(c for c in CANDIDATES if c.name == key)
    lr = rows[key]["learning_rate"]
    for length in (1.0, factor):
      if length != 1.0:
        runs = {
          rate: study.run(name, candidate, rate, 0, "tune", length)
          for rate in (lr / 2, lr)
        }
        lr = _score(runs, False, workload.higher_is_better)[1]
      row = {"candidate": key, "polyak": False, "learning_rate": lr}
      out.append({
        "workload": name,
        "steps": study.steps(name, length),
        "candidate": key,
        "learning_rate": lr,
        "test": _test(study, name, row, length),
      })  # fmt: skip
  return out


def markdown(report: dict) -> str:
  """The leave-one-out tables, the levers' worth and the long runs."""
  lines = [
    f"Leave-one-workload-out on {', '.join(report['workloads'])} "
    f"({report['wall_s'] / 60:.0f} min wall, `{report['command']}`). "
    "Test metric, mean ± std over 3 seeds; gap: relative loss (LMs) or "
    "relative error rate (classifier) against the tuned Adam; positive is worse.",
  ]
  for budget in BUDGETS:
    lines += [
      "",
      f"Budget: state at most {budget:.0%} of Adam's.",
      "",
      "| held-out workload | chosen on the others | SM3 test | tuned Adam | Adam test | gap | state / Adam's |",
      "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
      f"| {r['workload']} | {r['chosen']} | {_mean_std(r['metric'], r['sm3'])} | "
      f"{r['adam']} | {_mean_std(r['metric'], r['adam_test'])} | {r['gap']:+.2%} | "
      f"{r['memory']:.1%} |"
      for r in report["leave_one_out"]
      if r["budget"] == budget
    ]
  names, table = report["workloads"], report["table"]
  rows = [
    (
      f"{key} (`sm3_recipe`)" if key == RECIPE.name else key,
      [table[n]["rows"][key]["gap"] for n in names],
      f"{max(table[n]['rows'][key]['memory'] for n in names):.1%}",
    )
    for key in table[names[0]]["rows"]
  ]
  title = (
    "Each setting's validation gap to the tuned Adam (seed 0, best rate of its grid):"
  )
  lines += gap_table(title, "setting", names, rows, "state / Adam's")
  if report.get("long"):
    lines += [
      "",
      "Training length (test metric, 3 seeds, rates re-tuned at each length):",
      "",
      "| workload | steps | setting | rate | test |",
      "|---|---:|---|---:|---:|",
    ]
    lines += [
      f"| {r['workload']} | {r['steps']} | {r['candidate']} | "
      f"{r['learning_rate']:.3g} | {r['test']['mean']:.4f} ± {r['test']['std']:.4f} |"
      for r in report["long"]
    ]
  return "\n".join(lines)
