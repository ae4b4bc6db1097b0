"""benchmarks.sparse_scale: the plan the scaling guide quotes, and a tiny run."""

import json
import pathlib
import re

import pytest

from benchmarks import sparse_scale

ROOT = pathlib.Path(__file__).parents[1]


def _table_rows(text, first_cell):
  return [
    [cell.strip() for cell in line.strip("|").split("|")]
    for line in text.splitlines()
    if line.startswith(f"| {first_cell}")
  ]


def test_the_scaling_guide_quotes_the_plan(tmp_path):
  sparse_scale.main(["--section", "plan", "--out", str(tmp_path)])
  made = (tmp_path / "sparse_scale_plan.md").read_text()
  guide = (ROOT / "docs" / "guides" / "scaling_out.md").read_text()
  for name in sparse_scale.PLAN:
    assert _table_rows(guide, name) == _table_rows(made, name), name
  assert len(_table_rows(made, "")) >= 3 * len(sparse_scale.PLAN)


def test_plan_bytes_follow_the_state():
  recipe = sparse_scale.plan_case("sm3_recipe", 8)
  momentum = sparse_scale.plan_case("momentum 0.9", 8)
  # The rows' accumulator and `last`; then 128 float32 of momentum more.
  assert recipe["state_bytes_per_row"] == 8
  assert momentum["state_bytes_per_row"] == 8 + 128 * 4
  assert recipe["sweep_rows"] == 256
  # The ring: 5 maps of float32 per slot, about W + 3 sqrt(W) slots.
  window = -(-sparse_scale.PLAN_ROWS // 256)
  assert 20 * window < recipe["replicated_bytes"] < 20 * (window + 4 * window**0.5)


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path):
  results = sparse_scale.main(["--quick", "--out", str(tmp_path)])
  laws = {r["ids"] for r in results["curve"]}
  assert laws == set(sparse_scale.LAWS)
  assert all(r["median_s"] > 0 and r["temp_bytes"] > 0 for r in results["curve"])
  fitted = [r for r in results["nnx"] if "failed" not in r]
  assert len(fitted) == len(sparse_scale.NNX_CASES), results["nnx"]
  for name in ("curve", "nnx", "plan"):
    json.loads((tmp_path / f"sparse_scale_{name}.json").read_text())
  assert re.search(
    r"\| sparse \| 2\^14 float32 \| 0.9 \|",
    (tmp_path / "sparse_scale_nnx.md").read_text(),
  )
