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


def setup(app):
  app.connect("builder-inited", draw)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
