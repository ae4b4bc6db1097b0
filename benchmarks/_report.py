"""Reporting: the Markdown table, the goal check, the JSON file and the plots."""

from __future__ import annotations

import json
import math
import pathlib

_GOAL_GAP = 0.02  # SM3 (momentum 0) within 2% of Adam's metric ...
_GOAL_MEMORY = 0.02  # ... with at most 2% of Adam's optimizer memory.


def _bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError


def goal(result: dict) -> dict | None:
  """SM3 (momentum 0) against Adam on one workload, or ``None`` if either is absent.

  Returns:
    A dict with ``gap`` (how much worse SM3's mean metric is, as a fraction
    of Adam's; negative when SM3 is better), ``memory`` (SM3's state bytes
    over Adam's) and ``met`` (both within 2%).
  """
  opts = result["optimizers"]
  if "sm3-m0" not in opts or "adam" not in opts:
    return None
  sm3, adam = opts["sm3-m0"], opts["adam"]
  worse = sm3["metric_mean"] - adam["metric_mean"]
  if result["higher_is_better"]:
    worse = -worse
  gap = worse / abs(adam["metric_mean"])
  memory = sm3["state_bytes"] / adam["state_bytes"]
  met = bool(gap <= _GOAL_GAP and memory <= _GOAL_MEMORY)
  return {"gap": gap, "memory": memory, "met": met}


def markdown(results: dict) -> str:
  """The results as Markdown: one table per workload and the goal line."""
  lines = []
  for name, result in results["workloads"].items():
    seeds = len(next(iter(result["optimizers"].values()))["runs"])
    lines += [
      f"### {name}: {result['metric']} after {result['steps']} steps "
      f"(mean ± std over {seeds} seeds)",
      "",
      f"Parameters: {_bytes(result['param_bytes'])}.",
      "",
      f"| optimizer | learning rate | {result['metric']} | optimizer state "
      "| state / params | step time |",
      "|---|---:|---:|---:|---:|---:|",
    ]
    for opt_name, opt in result["optimizers"].items():
      lines.append(
        f"| {opt_name} | {opt['learning_rate']:g} "
        f"| {opt['metric_mean']:.4f} ± {opt['metric_std']:.4f} "
        f"| {_bytes(opt['state_bytes'])} | {opt['state_ratio']:.3f}x "
        f"| {opt['step_ms']:.2f} ms |"
      )
    check = goal(result)
    if check is not None:
      verdict = "met" if check["met"] else "not met"
      lines += [
        "",
        f"Goal (sm3-m0 within 2% of adam with <= 2% of its memory): {verdict}; "
        f"sm3-m0 is {100 * check['gap']:+.2f}% "
        f"({'worse' if check['gap'] > 0 else 'better'}) with "
        f"{100 * check['memory']:.2f}% of adam's optimizer memory.",
      ]
    lines.append("")
  return "\n".join(lines)


def plot(results: dict, folder: pathlib.Path) -> list[pathlib.Path]:
  """One PNG per workload: loss vs step, and metric vs optimizer memory."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  paths = []
  for name, result in results["workloads"].items():
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    chunk = result["chunk"]
    for opt_name, opt in result["optimizers"].items():
      curves = [run["losses"] for run in opt["runs"]]
      mean = [sum(c) / len(c) for c in zip(*curves, strict=True)]
      steps = [chunk * (i + 1) for i in range(len(mean))]
      left.plot(steps, mean, label=opt_name)
      right.errorbar(
        opt["state_bytes"], opt["metric_mean"], yerr=opt["metric_std"],
        fmt="o", capsize=3, label=opt_name,
      )  # fmt: skip
    finite = [x for o in result["optimizers"].values() for r in o["runs"]
              for x in r["losses"] if math.isfinite(x)]  # fmt: skip
    if finite:
      low = min(finite)
      left.set_ylim(low - 0.05 * abs(low), sorted(finite)[len(finite) * 9 // 10])
    left.set(xlabel="step", ylabel="training loss (mean over seeds)", title=name)
    left.legend()
    right.set_xscale("log")
    right.set(xlabel="optimizer state (bytes)", ylabel=result["metric"], title=name)
    right.legend()
    fig.tight_layout()
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def write(results: dict, folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes ``results.json``, ``results.md`` and the plots into ``folder``."""
  folder.mkdir(parents=True, exist_ok=True)
  json_path = folder / "results.json"
  json_path.write_text(json.dumps(results, indent=1))
  md_path = folder / "results.md"
  md_path.write_text(markdown(results))
  pngs = plot(results, folder)
  return {"json": json_path, "markdown": md_path, **{p.stem: p for p in pngs}}
