"""The transfer studies' logic (benchmarks/transfer.py, _study.py), no training."""

import dataclasses
import inspect
import json
import math
import pathlib
import zlib

import _tiers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3
from benchmarks import _runner, _study, transfer

# Above merge_axes_up_to=2048 entries, so the recipe keeps factored state.
PARAMS = {
  "embedding": jnp.linspace(-1.0, 1.0, 400 * 8).reshape(400, 8),
  "w": jnp.linspace(0.5, -0.5, 8 * 300).reshape(8, 300),
  "b": jnp.zeros((300,)),
}


def _loss(params, x):
  h = params["embedding"][x] @ params["w"] + params["b"][None, :]
  return jnp.mean(jnp.tanh(h) ** 2)


def _train(tx, steps=20):
  params, state = PARAMS, tx.init(PARAMS)
  for step in range(steps):
    x = jnp.arange(step, step + 6) % 400
    grads = jax.grad(_loss)(params, x)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize("cooldown", _tiers.fast_first(transfer.COOLDOWNS, [0.3]))
def test_recipe_candidate_is_the_library_recipe_bit_for_bit(cooldown):
  # The candidates' fields spell the library's recipe (which they call) at
  # each cool-down: the lever study's RECIPE is the recipe at 10%.
  candidate = transfer.recipe(cooldown)
  assert (candidate is _study.RECIPE) == (cooldown == 0.1)
  ours = _train(dataclasses.replace(candidate, factory=None).make(3e-2, 20))
  library = _train(optax_sm3.sm3_recipe(3e-2, 20, decay_fraction=cooldown))
  jax.tree.map(np.testing.assert_array_equal, ours, library)
  jax.tree.map(np.testing.assert_array_equal, _train(candidate.make(3e-2, 20)), library)


def test_base_candidate_is_the_library_recipe_at_beta_0_9():
  # The lever study's base: sm3_recipe at beta 0.9, without bias correction.
  ours = _train(_study.BASE.make(3e-2, 20))
  library = _train(
    optax_sm3.sm3_recipe(3e-2, 20, beta=0.9, bias_correction=False, decay_fraction=0.1)
  )
  jax.tree.map(np.testing.assert_array_equal, ours, library)


@pytest.mark.parametrize(
  ("fields", "checks"),
  [
    ({"schedule": "constant", "warmup": 0.0}, {0: 1.0, 50: 1.0}),
    ({"schedule": "constant", "warmup": 0.1}, {0: 0.0, 5: 0.25, 10: 1.0}),
    ({"schedule": "cooldown"}, {50: 1.0, 95: 0.5, 100: 0.0}),
    ({"schedule": "cosine", "warmup": 0.1}, {5: 0.5, 10: 1.0, 55: 0.5}),
    ({"schedule": "cosine", "warmup": 0.0}, {0: 1.0, 50: 0.5, 100: 0.0}),
  ],
)
def test_schedules(fields, checks):
  schedule = _study.Candidate("c", **fields).schedule_fn(2.0, 100)
  for step, factor in checks.items():
    assert float(schedule(step)) == pytest.approx(2.0 * factor, abs=1e-6), step


def _candidate(name):
  return next(c for c in _study.CANDIDATES if c.name == name)


@pytest.mark.slow  # every study candidate's training
def test_every_candidate_trains_and_states_cost_what_they_say():
  param_bytes = _runner.tree_bytes(PARAMS)
  sizes = {}
  for candidate in _study.CANDIDATES:
    tx = candidate.make(1e-2, 20)
    params = _train(tx, 3)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    sizes[candidate.name] = _runner.tree_bytes(jax.eval_shape(tx.init, PARAMS))
  recipe = sizes[_study.RECIPE.name]
  # mu and nu, and two int32 counts (Adam's and the schedule's).
  assert sizes["adam constant"] == 2 * param_bytes + 8
  assert recipe < 0.1 * sizes["adam constant"]
  # bfloat16 momentum: one 2-byte number per parameter entry.
  assert sizes["bf16 momentum 0.9"] - recipe == param_bytes // 2
  for name in ("RMS update clipping 1.0", "per-shape rate (parameter RMS)"):
    assert sizes[name] == recipe  # the levers keep no state
  assert sizes["rising beta"] == recipe


def test_rms_clipping_bounds_each_update():
  candidate = dataclasses.replace(_candidate("RMS update clipping 1.0"), clip_rms=0.5)
  tx = candidate.make(1.0, 4)  # warm-up over 2% of 4 steps: rate 1 at once
  grads = jax.tree.map(lambda p: p + 1.0, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  for u in jax.tree.leaves(updates):
    assert float(jnp.sqrt(jnp.mean(u * u))) <= 0.5 + 1e-6


class _Workload:
  def __init__(self, higher):
    self.higher_is_better = higher


def test_gap_is_relative_loss_or_relative_error():
  assert _study._gap(_Workload(False), 1.02, 1.0) == pytest.approx(0.02)
  # accuracy 0.90 against 0.95: error 0.10 against 0.05, twice as many errors.
  assert _study._gap(_Workload(True), 0.90, 0.95) == pytest.approx(1.0)
  assert math.isnan(_study._gap(_Workload(False), math.nan, 1.0))


def _table(gaps, memory):
  """A tuned table: ``gaps[workload][setting]``, ``memory[setting]``."""
  return {
    name: {
      "tuned_adam": "adam constant",
      "rows": {key: {"gap": gap, "memory": memory[key]} for key, gap in by_key.items()},
    }
    for name, by_key in gaps.items()
  }


def test_choose_minimises_the_worst_gap_on_the_other_workloads_only():
  memory = {"adam constant": 1.0, "a": 0.02, "b": 0.02, "heavy": 0.25}
  gaps = {
    "w1": {"adam constant": 0.0, "a": 0.01, "b": 0.03, "heavy": -0.05},
    "w2": {"adam constant": 0.0, "a": 0.04, "b": 0.02, "heavy": -0.05},
    "w3": {"adam constant": 0.0, "a": 0.50, "b": 0.00, "heavy": -0.05},
  }
  table = _table(gaps, memory)
  # Held out w3: on w1, w2 the worst gaps are a 4%, b 3%.
  assert _study.choose(table, "w3", 0.03) == "b"
  # The held-out workload's own gaps never count.
  gaps["w3"]["b"] = 9.0
  assert _study.choose(_table(gaps, memory), "w3", 0.03) == "b"
  # Held out w1: on w2, w3 a's worst is 50%, b's 2%.
  assert _study.choose(table, "w1", 0.03) == "b"
  # A larger budget admits the momentum setting; a diverged run never wins.
  assert _study.choose(table, "w1", 0.30) == "heavy"
  gaps["w3"]["b"] = 0.0
  gaps["w2"]["heavy"] = math.nan
  assert _study.choose(_table(gaps, memory), "w1", 0.30) == "b"


def test_tune_follows_a_best_edge_outwards():
  calls = []

  class _Study(_study.Study):
    def workload(self, name):
      return _Workload(False)

    def run(self, name, candidate, lr, seed, split, factor=1.0):
      calls.append(lr)
      return {"metric": abs(math.log2(lr / 0.001))}  # best at 1e-3

  study = _Study(1.0, 3, 1, {"runs": {}}, lambda: None, lambda _: None)
  metrics = study.tune("w", _study.RECIPE)
  grid = _study.RECIPE.grid(3)
  assert calls[:3] == list(grid)
  assert calls[3:] == [grid[0] / 2]  # one rate past the low edge
  assert set(metrics) == {*grid, grid[0] / 2}


class _FakeStudy(_study.Study):
  """Metrics from a formula: each setting has a fixed quality per workload."""

  def workload(self, name):
    workload = _Workload(name == "classifier")
    workload.metric = "test accuracy" if workload.higher_is_better else "test loss"
    workload.steps = 100
    return workload

  def run(self, name, candidate, lr, seed, split, factor=1.0):
    quality = zlib.crc32(f"{name} {candidate.name}".encode()) % 100 / 1000
    off = abs(math.log2(lr / candidate.grid(3)[1])) / 100
    value = 1.0 + quality + off + seed / 1000
    if self.workload(name).higher_is_better:
      value = 1.0 - value / 10
    adam = candidate.family == "adam"
    self.record["runs"][(name, candidate.name, factor, lr, seed, split)] = value
    return {
      "metric": value,
      "polyak_metric": value - 0.001,
      "losses": [2.0, 1.5, value],
      "state_bytes": 1000 if adam else (250 if candidate.momentum else 20),
      "polyak_bytes": 0 if adam else 250,
    }


def test_study_end_to_end_on_fake_runs():
  names = ("lm", "code", "classifier")
  study = _FakeStudy(1.0, 3, 1, {"runs": {}}, lambda: None, lambda _: None)
  table = _study.tuned_table(study, names)
  for name in names:
    rows = table[name]["rows"]
    assert rows[table[name]["tuned_adam"]]["gap"] == 0.0
    assert rows[_study.RECIPE.name + _study.POLYAK]["memory"] == 0.27
  results = _study.leave_one_out(study, table)
  assert len(results) == len(_study.BUDGETS) * len(names)
  for r in results:
    assert r["chosen"] == _study.choose(table, r["workload"], r["budget"])
    assert r["memory"] <= r["budget"]
    assert len(r["sm3"]["metrics"]) == _study.SEEDS
  report = {
    "workloads": names,
    "table": table,
    "leave_one_out": results,
    "long": _study.long_runs(study, table, 5.0),
    "wall_s": 60.0,
    "command": "python -m benchmarks.transfer",
  }
  text = _study.markdown(report)
  for r in results:
    assert f"| {r['workload']} | {r['chosen']} |" in text
  assert text.count("| lm | 100 |") == 3 and text.count("| lm | 500 |") == 3
  # At 5x: two rates on validation, then 3 seeds on test, for each of the three.
  long_runs = [k for k in study.record["runs"] if k[2] == 5.0]
  assert len(long_runs) == 3 * (2 + _study.SEEDS)


def _rate_table(gaps, rest=9.0):
  """A rate table: ``gaps[workload]`` maps settings of transfer.GRID to gaps (else ``rest``)."""
  return {
    name: {"gaps": [values.get(s, rest) for s in transfer.GRID]}
    for name, values in gaps.items()
  }


def test_choose_rate_minimises_the_worst_gap_on_the_other_workloads_only():
  rates, nan = transfer.RATES, math.nan
  assert len(rates) == 9 and rates[::2] == tuple(2e-3 * 2.0**k for k in range(5))
  assert transfer.GRID == tuple((c, lr) for c in transfer.COOLDOWNS for lr in rates)
  a, b, c, d = (0.1, rates[1]), (0.3, rates[2]), (0.5, rates[2]), (0.98, rates[3])
  table = _rate_table({
    "lm": {a: 0.01, b: 0.00, c: 0.02, d: 0.10},
    "classifier": {a: 0.20, b: 0.08, c: 0.03, d: 0.01},
    "code": {a: 0.00, b: 0.01, c: nan, d: 0.20},
  })  # fmt: skip
  # Worst over all: a 0.20, b 0.08, c inf (a diverged run), d 0.20.
  assert transfer.choose_rate(table) == b
  # Held out the classifier: a and b tie at (0.01, 0.00): the earlier setting.
  assert transfer.choose_rate(table, "classifier") == a
  # Held out code: a 0.20, b 0.08, c 0.03, d 0.10.
  assert transfer.choose_rate(table, "code") == c
  # A tie of the worst gap (a few validation errors) goes to the second-worst.
  tied = _rate_table({
    "digits": {a: 1.5, b: 1.5, c: 1.5, d: 2.0},
    "lm": {a: 0.02, b: 0.01, c: 0.03, d: 0.00},
  })  # fmt: skip
  assert transfer.choose_rate(tied) == b
  assert transfer.label(b) == f"30% cool-down, {rates[2]:g}"
  # A workload's gaps at more steps count as one more workload's, and leave
  # with it.
  table["classifier"]["long_gaps"] = _rate_table({"x": {c: 0.05, d: 0.02}})["x"]["gaps"]
  # Worst over all: a 9, b 9, c inf, d 0.20.
  assert transfer.choose_rate(table) == d
  assert transfer.choose_rate(table, "classifier") == a
  assert transfer.choose_rate(table, "code") == c


def test_rate_study_end_to_end_on_fake_runs(monkeypatch):
  monkeypatch.setattr(transfer, "LONG_WORKLOAD", "classifier")
  names = ("lm", "code", "classifier")
  study = _FakeStudy(1.0, 3, 3, {"runs": {}}, lambda: None, lambda _: None)
  report = transfer.default_rate_study(study, names, seeds=3, long=5.0)
  table = report["table"]
  assert report["default"] == list(transfer.choose_rate(table))

  def setting(test):
    return [test["cooldown"], test["learning_rate"]]

  for r in report["scores"]:
    tests = r["tests"]
    assert tests["tuned adam"]["gap"] == 0.0
    assert setting(tests["untuned recipe"]) == report["default"]
    held_out = transfer.choose_rate(table, r["workload"])
    assert setting(tests["held-out choice"]) == list(held_out)
    assert setting(tests["tuned recipe"]) == table[r["workload"]]["tuned"]
    assert tests["adam(1e-3)"]["learning_rate"] == 1e-3
    # More seeds on the classifier whose gap was unresolved.
    assert len(tests["untuned recipe"]["metrics"]) == r["seeds"]
    assert r["seeds"] == (5 if r["workload"] == "classifier" else 3)
    assert r["state_ratio"] == 20 / 1000
    # Every setting a fold chose, and the previous default, is scored on
    # every workload.
    others = {transfer.choose_rate(table, n) for n in names}
    others = sorted({*others, transfer.PREVIOUS_DEFAULT} - {tuple(report["default"])})
    assert r["other_settings"] == [list(s) for s in others]
    for s in others:
      assert setting(tests[f"recipe at {transfer.label(s)}"]) == list(s)
  # The fake setting is best at the middle of its grid: every rate was run,
  # and the best Adam is interior (no edge followed).
  for name in names:
    assert len(table[name]["gaps"]) == len(transfer.GRID)
    for adam in transfer.ADAMS:
      lrs = {k[3] for k in study.record["runs"] if k[:2] == (name, adam.name)}
      assert (
        min(lrs) < table[name]["adam_schedules"][adam.name]["learning_rate"] < max(lrs)
      )
  (long,) = report["long"]
  assert long["steps"] == 500 and long["seeds"] == 5
  # At 5x the steps every setting is the one chosen at 1x: the fold's choice
  # is the one made without the classifier, the default the one made with it.
  assert long["workload"] == "classifier"
  assert setting(long["tests"]["held-out choice"]) == list(
    transfer.choose_rate(table, "classifier")
  )
  assert setting(long["tests"]["untuned recipe"]) == report["default"]
  assert long["other_settings"] == report["scores"][0]["other_settings"]
  assert {k[2] for k in study.record["runs"] if k[0] == "classifier"} == {1.0, 5.0}
  text = transfer.rate_markdown(report | {"wall_s": 60.0, "command": "c"})
  # A row in the results, the other settings', the state and the leave-one-out
  # tables.
  for name in names:
    assert sum(line.startswith(f"| {name} |") for line in text.splitlines()) == 4
  # The validation gaps: the loss workloads' table, then the classifiers' with
  # the worst over every column (the 5x steps' too).
  gaps = text.split("at each setting (seed 0), the loss workloads:")[1]
  loss, classifiers = gaps.split("at each setting (seed 0), the classifiers:")
  assert "| cool-down, rate | lm | code | worst |" in loss
  header = (
    "| cool-down, rate | classifier | classifier (5x steps) | worst | worst of all |"
  )
  assert header in classifiers
  for i, setting in enumerate(transfer.GRID):
    every = [table[n]["gaps"][i] for n in names] + [table["classifier"]["long_gaps"][i]]
    (row,) = [
      r
      for r in classifiers.splitlines()
      if r.startswith(f"| {transfer.label(setting)} |")
    ]
    assert row.endswith(f" {max(every):+.2%} |"), row
  assert "classifier at 500 steps (5 seeds; every setting as chosen at the 1x" in text


def test_rate_study_reuses_the_lever_studys_adam():
  """On the lever study's workloads Adam's tuning and test runs are its own."""
  levers = json.loads(transfer.LEVERS.read_text())

  class _Seeded(_study.Study):
    def workload(self, name):
      workload = _Workload(name == "cmudict-syllables")
      workload.steps = 400
      return workload

  study = _Seeded(1.0, 3, 3, {"runs": {}}, lambda: None, lambda _: None)
  for name in _study.WORKLOADS:
    adams = transfer._committed_adam(study, name)
    (fold,) = [
      r
      for r in levers["leave_one_out"]
      if r["workload"] == name and r["budget"] == _study.BUDGETS[0]
    ]
    assert adams[fold["adam"]][1] == fold["adam_lr"]
    runs = _study.Study.run.__get__(study)  # the record answers, no training
    metrics = [runs(name, transfer._adam(fold["adam"]), fold["adam_lr"], seed, "final")
               ["metric"] for seed in range(3)]  # fmt: skip
    assert metrics == fold["adam_test"]["metrics"]
  assert transfer._committed_adam(study, "digits-conv") is None


def test_every_folds_setting_is_scored_on_every_workload():
  grid, previous = transfer.GRID, transfer.PREVIOUS_DEFAULT
  a, b = grid[3], grid[6]
  assert previous in grid and previous not in (a, b)
  table = {
    name: {
      "gaps": [gaps.get(s, 0.9) for s in grid],
      "tuned_adam": "adam constant",
      "adam_lr": 4e-3,
      "tuned": list(grid[1]),
      "higher_is_better": name == "classifier",
    }
    for name, gaps in {
      "lm": {a: 0.00, b: 0.02},
      "classifier": {a: 0.50, b: 0.10},
    }.items()
  }
  study = _FakeStudy(1.0, 3, 3, {"runs": {}}, lambda: None, lambda _: None)
  scores = transfer.score_rates(study, table, seeds=3, other_settings=[previous])
  # Worst gaps: a 0.50, b 0.10, the rest 0.9; each fold picks the other's best.
  assert [r["fold_choice"] for r in scores] == [list(b), list(a)]
  assert {tuple(r["default"]) for r in scores} == {b}
  for r in scores:
    assert r["other_settings"] == [list(previous), list(a)]
    for s in (a, previous):
      test = r["tests"][f"recipe at {transfer.label(s)}"]
      assert (test["cooldown"], test["learning_rate"]) == s
  report = {
    "default": list(b),
    "grid": [list(s) for s in grid],
    "workloads": list(table),
    "table": table,
    "scores": scores,
    "wall_s": 60.0,
    "command": "c",
  }
  tables = transfer.rate_markdown(report).split("\n\n")
  header, rule, *_ = tables[1].splitlines()
  assert header.count("|") == rule.count("|")
  # The other settings' table, a column each.
  assert tables[2].startswith("The recipe untuned at the other settings")
  header, rule, *rows = tables[3].splitlines()
  assert header.count("|") == rule.count("|") == 4
  assert f"| {transfer.label(a)} (a fold's choice) |" in header
  assert f"| {transfer.label(previous)} (the previous default) |" in header
  assert [r.count("|") for r in rows] == [4, 4]


def test_guide_tables_are_the_committed_rate_study():
  """The recipe guide shows docs/_data/recipe.json's tables; sm3_recipe its default."""
  docs = pathlib.Path(__file__).parents[1] / "docs"
  data = json.loads((docs / "_data" / "recipe.json").read_text())
  guide = (docs / "guides" / "recipe.md").read_text()
  rows = [
    line for line in transfer.rate_markdown(data).splitlines() if line.startswith("| ")
  ]
  assert len(rows) > 2 * len(data["workloads"])
  for line in rows:
    assert line in guide, line
  parameters = inspect.signature(optax_sm3.sm3_recipe).parameters
  defaults = [parameters[k].default for k in ("decay_fraction", "learning_rate")]
  assert defaults == data["default"]
  assert data["workloads"] == list(transfer.RATE_WORKLOADS)
  assert data["grid"] == [list(s) for s in transfer.GRID]


def test_readme_table_is_the_committed_rate_study():
  """The README's recipe table: every row of headline_markdown(recipe.json), with its time."""
  root = pathlib.Path(__file__).parents[1]
  data = json.loads((root / "docs" / "_data" / "recipe.json").read_text())
  readme = (root / "README.md").read_text()
  rows = transfer.headline_markdown(data).splitlines()
  assert len(rows) == 2 + len(data["scores"]) + len(data["long"])
  for line in rows:
    assert line in readme, line
  assert f"`{data['command']}`, {data['wall_s'] / 60:.0f} min" in readme
