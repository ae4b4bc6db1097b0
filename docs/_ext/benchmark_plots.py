"""Draws the benchmark plots from docs/_data/*.json when the build starts.

The numbers live in a small committed JSON file (copied from the README's
tables); the PNGs are build artefacts written to docs/_generated/.
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


def draw(app):
  if app.builder.format != "html":
    return
  src = pathlib.Path(app.srcdir)
  data = json.loads((src / "_data" / "benchmarks.json").read_text())
  out = src / "_generated"
  out.mkdir(exist_ok=True)
  _movielens(data, out)
  _step_time(data, out)


def setup(app):
  app.connect("builder-inited", draw)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
