"""Reporting: the helpers every benchmark shares (:func:`format_bytes`,
:func:`table`, :func:`machine`, :func:`save`), then the main job's tables, goal
check and files."""

from __future__ import annotations

import json
import os
import pathlib
import platform

import jax
import optax

import optax_sm3

_GOAL_GAP = 0.02  # the recipe within 2% of the tuned Adam's metric ...
_GOAL_MEMORY = 0.03  # ... with at most 3% of Adam's optimizer memory.
RECIPE = "sm3-recipe"
ADAMS = ("adam", "adam-wsd")  # constant rate; the recipe's warm-up + cool-down


_UNITS = ("B", "KiB", "MiB", "GiB")


def format_bytes(
  n: float, unit: str | None = None, digits: int = 1, *, label: bool = True
) -> str:
  """``n`` bytes as ``"1.5 MiB"``: in ``unit`` (by default the largest, up to GiB,
  that keeps it >= 1); whole bytes; ``label=False`` leaves the unit out."""
  if unit is None:
    unit = _UNITS[sum(n >= 1024**i for i in range(1, len(_UNITS)))]
  value = n / 1024 ** _UNITS.index(unit)
  text = f"{value:,.{0 if unit == 'B' else digits}f}"
  return f"{text} {unit}" if label else text


def table(header, rows, align: str = "") -> list[str]:
  """A Markdown table's lines; ``align`` has ``l``, ``r`` or ``c`` per column (by
  default the first left, the others right)."""
  rules = {"l": "---", "r": "---:", "c": ":-:"}
  align = align or "l" + "r" * (len(header) - 1)

  def line(cells):
    return "| " + " | ".join(map(str, cells)) + " |"

  return [line(header), "|" + "|".join(rules[a] for a in align) + "|", *map(line, rows)]


def machine(backend: bool = True) -> dict:
  """The versions and the machine of a run; ``backend`` adds JAX's devices
  (which a parent of measuring children must leave unstarted)."""
  info = {
    "jax": jax.__version__,
    "optax": optax.__version__,
    "optax_sm3": optax_sm3.__version__,
    "platform": platform.platform(),
    "machine": platform.machine(),
    "processor": platform.processor(),
    "cpus": os.cpu_count(),
  }
  if backend:
    info["device"] = jax.devices()[0].device_kind
    info["devices"] = jax.device_count()
  return info


def save(folder: pathlib.Path | str, stem: str, table: str, result) -> None:
  """Writes ``stem.md`` (``table``) and ``stem.json`` (``result``); prints the table."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"{stem}.md").write_text(table)
  (folder / f"{stem}.json").write_text(json.dumps(result, indent=2))
  print(table)


def tuned_adam(result: dict) -> str | None:
  """The Adam variant (of :data:`ADAMS`) with the best validation metric at its
  chosen rate; ``None`` if none ran."""
  opts, sign = result["optimizers"], -1 if result["higher_is_better"] else 1
  present = [name for name in ADAMS if name in opts]

  def validation(name):
    return sign * opts[name]["validation"][repr(opts[name]["learning_rate"])]

  return min(present, key=validation) if present else None


def goal(result: dict, name: str = RECIPE) -> dict | None:
  """``name`` against the tuned Adam on one workload (``None`` if either is absent):
  the ``adam`` variant, the relative ``gap`` (positive: worse), the state
  ``memory`` ratio and whether the goal is ``met``."""
  opts = result["optimizers"]
  adam_name = tuned_adam(result)
  if name not in opts or adam_name is None:
    return None
  ours, adam = opts[name], opts[adam_name]
  sign = -1 if result["higher_is_better"] else 1
  gap = sign * (ours["metric_mean"] - adam["metric_mean"]) / abs(adam["metric_mean"])
  memory = ours["state_bytes"] / adam["state_bytes"]
  met = bool(gap <= _GOAL_GAP and memory <= _GOAL_MEMORY)
  return {"adam": adam_name, "gap": gap, "memory": memory, "met": met}


def markdown(results: dict) -> str:
  """The results as Markdown: one table per workload and the goal line."""
  lines = []
  for name, result in results["workloads"].items():
    seeds = len(next(iter(result["optimizers"].values()))["runs"])
    lines += [
      f"### {name}: {result['metric']} after {result['steps']} steps "
      f"(mean ± std over {seeds} seeds)",
      "",
      f"Parameters: {format_bytes(result['param_bytes'])}.",
      "",
      f"| optimizer | learning rate | {result['metric']} | optimizer state "
      "| state / params | step time |",
      "|---|---:|---:|---:|---:|---:|",
    ]
    for opt_name, opt in result["optimizers"].items():
      lines.append(
        f"| {opt_name} | {opt['learning_rate']:g} "
        f"| {opt['metric_mean']:.4f} ± {opt['metric_std']:.4f} "
        f"| {format_bytes(opt['state_bytes'])} | {opt['state_ratio']:.3f}x "
        f"| {opt['step_ms']:.2f} ms |"
      )
    for name in (RECIPE, "sm3-m0"):
      check = goal(result, name)
      if check is None:
        continue
      line = (
        f"{name} is {100 * abs(check['gap']):.2f}% "
        f"{'worse' if check['gap'] > 0 else 'better'} than the tuned Adam "
        f"({check['adam']}, chosen on validation) with "
        f"{100 * check['memory']:.2f}% of its optimizer memory"
      )
      if name == RECIPE:
        verdict = "met" if check["met"] else "not met"
        line = f"Goal (within 2% with <= 3% of the memory): {verdict}; {line}"
      lines += ["", line + "."]
    lines.append("")
  return "\n".join(lines)


def write(results: dict, folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes ``results.json`` and ``results.md`` into ``folder``."""
  folder.mkdir(parents=True, exist_ok=True)
  json_path = folder / "results.json"
  json_path.write_text(json.dumps(results, indent=1))
  md_path = folder / "results.md"
  md_path.write_text(markdown(results))
  return {"json": json_path, "markdown": md_path}
