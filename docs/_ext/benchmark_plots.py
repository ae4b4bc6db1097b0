"""Draws the benchmark plots from docs/_data/*.json when the build starts.

The numbers live in a small committed JSON file (copied from the README's
tables and the benchmark run behind them); the PNGs are build artefacts
written to docs/_generated/.
"""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _movielens(data, out):
  rows = data["movielens"]["rows"]
  fig, ax = plt.subplots(figsize=(7.0, 3.6), dpi=120)
  for row in rows:
    ax.errorbar(
      row["state_kib"],
      row["rmse"],
      yerr=row["rmse_std"],
      fmt="o",
      capsize=3,
      label=row["optimizer"],
    )
  ax.set_xscale("log")
  ax.set_xlabel("optimizer state (KiB, log scale)")
  ax.set_ylabel("test RMSE (lower is better)")
  ax.set_title("MovieLens-100k, 3 seeds: accuracy vs optimizer memory")
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out / "movielens_memory.png")
  plt.close(fig)


def _step_time(data, out):
  sweep = data["step_time_sweep"]
  fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=120)
  for name, times in sweep["ms"].items():
    ax.plot(sweep["params_m"], times, marker="o", label=name)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("parameters (millions)")
  ax.set_ylabel("median step time (ms)")
  ax.set_title("Step time vs size, float32, CPU")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(out / "step_time_sweep.png")
  plt.close(fig)


def _loss_curves(data, out):
  curves = data["transformer_loss_curves"]
  chunk, steps = curves["chunk"], curves["steps"]
  # Each point is the mean training loss over a chunk: drawn at its middle.
  middles = [chunk * (i + 0.5) for i in range(steps // chunk)]
  reference = curves["train_loss"]["adam"]
  fig, (left, right) = plt.subplots(2, 1, figsize=(7.0, 6.6), dpi=120, sharex=True)
  for ax in (left, right):
    ax.axvspan(steps - curves["cooldown_steps"], steps, color="0.9", lw=0)
  for name, losses in curves["train_loss"].items():
    # The horizontal bar spans the chunk the mean is over.
    line = left.errorbar(middles, losses, xerr=chunk / 2, marker="o", label=name)
    line = line.lines[0]
    test = curves["test_loss"][name]
    left.plot([steps], [test], marker="*", ms=11, ls="", color=line.get_color())
    gap = [100 * (a / b - 1) for a, b in zip(losses, reference, strict=True)]
    right.plot(middles, gap, marker="o", color=line.get_color(), label=name)
    test_gap = 100 * (test / curves["test_loss"]["adam"] - 1)
    right.plot([steps], [test_gap], marker="*", ms=11, ls="", color=line.get_color())
  left.set_ylabel("loss")
  left.set_title("Char transformer: training loss; test loss (*)")
  left.legend(fontsize=8)
  right.axhline(0, color="0.4", lw=0.8)
  right.set_xlabel(
    "step (o: mean training loss over each 100-step bar; shaded: the recipe's "
    "cool-down)"
  )
  right.set_ylabel("vs adam (%)")
  right.set_title("The same, relative to adam at a constant rate (lower is better)")
  for ax in (left, right):
    ax.set_xlim(0, steps + 20)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out / "transformer_loss_curves.png")
  plt.close(fig)


def _transfer(data, out):
  """Training loss of each held-out workload's chosen SM3 and tuned Adam."""
  runs = data["leave_one_out"]
  names = data["workloads"]
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), dpi=120)
  for ax, name in zip(axes, names, strict=True):
    curves, budgets = {}, {}
    for r in runs:
      if r["workload"] != name:
        continue
      budgets.setdefault(r["chosen"], []).append(f"{r['budget']:.0%}")
      curves[r["chosen"]] = r["sm3"]["losses"]
      curves[f"tuned Adam: {r['adam']}"] = r["adam_test"]["losses"]
    curves = {
      f"SM3 ({', '.join(budgets[k])} budget): {k}" if k in budgets else k: v
      for k, v in curves.items()
    }
    for label, losses in curves.items():
      steps = [(i + 1) * 100 / len(losses) for i in range(len(losses))]
      ax.plot(steps, losses, marker="o", ms=3, label=label)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("% of training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  axes[0].set_ylabel("training loss (mean per chunk, seed 0)")
  fig.tight_layout()
  fig.savefig(out / "transfer_loss_curves.png")
  plt.close(fig)


def _recipe(data, out):
  """Training loss of the untuned recipe, the tuned Adam and adam(1e-3) per workload."""
  rows = data["scores"] + data.get("long", [])
  cols = 4
  fig, axes = plt.subplots(
    -(-len(rows) // cols),
    cols,
    figsize=(3.2 * cols, 3.0 * -(-len(rows) // cols)),
    dpi=120,
  )
  axes = axes.ravel()
  cooldown, rate = data["default"]
  labels = {
    "untuned recipe": f"sm3_recipe (default: {rate:g}, {cooldown:.0%} cool-down)",
    "tuned adam": "tuned Adam",
    "adam(1e-3)": "adam(1e-3)",
  }
  for ax, row in zip(axes, rows, strict=False):
    for key, label in labels.items():
      losses = row["tests"][key]["losses"]
      steps = [row["steps"] * (i + 0.5) / len(losses) for i in range(len(losses))]
      ax.plot(steps, losses, marker="o", ms=2, label=label)
    ax.set_title(f"{row['workload']}, {row['steps']} steps", fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3, which="both")
  for ax in axes[len(rows) :]:
    ax.axis("off")
  axes[0].set_ylabel("training loss (chunk mean, seed 0)")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "recipe_loss_curves.png")
  plt.close(fig)


def _sparse_scale(data, out):
  """The sparse step's time against the table's rows, per optimizer and id law."""
  fig, ax = plt.subplots(figsize=(7.0, 3.8), dpi=120)
  names = list(dict.fromkeys(r["optimizer"] for r in data["records"]))
  for i, name in enumerate(names):
    for law, style in (("uniform", "-"), ("zipf", ":"), ("sequential", "--")):
      mine = [r for r in data["records"] if r["optimizer"] == name and r["ids"] == law]
      ax.plot(
        [r["rows"] for r in mine],
        [1e3 * r["median_s"] for r in mine],
        style,
        marker="o",
        color=f"C{i}",
        label=f"{name} ({law})",
      )
  ax.set_xscale("log", base=2)
  ax.set_ylim(bottom=0)
  ax.set_xlabel("table rows V (x 64 float32)")
  ax.set_ylabel("median step time (ms)")
  ax.set_title(f"sparse_rows update, {data['batch']} ids a step, jitted, donated")
  ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(out / "sparse_scale.png")
  plt.close(fig)


def draw(app):
  if app.builder.format != "html":
    return
  src = pathlib.Path(app.srcdir)
  data = json.loads((src / "_data" / "benchmarks.json").read_text())
  out = src / "_generated"
  out.mkdir(exist_ok=True)
  _movielens(data, out)
  _step_time(data, out)
  _loss_curves(data, out)
  _transfer(json.loads((src / "_data" / "transfer.json").read_text()), out)
  _recipe(json.loads((src / "_data" / "recipe.json").read_text()), out)
  _sparse_scale(json.loads((src / "_data" / "sparse_scale.json").read_text()), out)


def setup(app):
  app.connect("builder-inited", draw)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
