"""A row-sharded sparse table trained across two processes.

Runs ``examples/multiprocess_sparse.py`` once (2 processes x 4 CPU devices
on ``jax.distributed``, and the one-process reference): both of its runs,
``sparse_tables`` and the NNX ``SparseOptimizer``, must match one process,
and every collective in their compiled train steps (read with the HLO parser
of ``tests/_sharding_worker.py``) must move the batch's ids and rows, never
the table or its state.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import _subprocess
import pytest
from _sharding_worker import _COLLECTIVE, _SHAPE, collectives

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "multiprocess_sparse.py"
sys.path.insert(0, str(EXAMPLE.parent))
import multiprocess_sparse as example  # noqa: E402

RUNS = ("tables", "nnx")
IDS = example.BATCH * example.FIELDS  # ids a step
SWEEP = math.ceil(example.ROWS / example.SWEEP_PERIOD)  # rows caught up a step
SHARD_ROWS = example.ROWS // example.MESH[0][0]  # a device's block of rows


def operands(hlo: str) -> list[tuple[str, list[str]]]:
  """``(op, ["f32[64,16]", ...])`` of each collective in ``hlo``."""
  found = []
  for line in hlo.splitlines():
    match = _COLLECTIVE.search(line)
    if match:
      shapes = [m.group(0) for m in _SHAPE.finditer(match.group(1))]
      found.append((match.group(2), shapes))
  return found


def _dims(shape: str) -> list[int]:
  return [int(d) for d in shape.split("[")[1].rstrip("]").split(",") if d]


def _itemsize(shape: str) -> int:
  bits = re.sub(r"\D", "", shape.split("[")[0])
  return int(bits) // 8 if bits else 1


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  hlo = tmp_path_factory.mktemp("hlo")
  env = _subprocess.cpu_env()
  env["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), env.get("PYTHONPATH")) if p
  )
  command = [sys.executable, str(EXAMPLE), "--steps", "4", "--timeout", "240"]
  proc = subprocess.run(
    [*command, "--hlo", str(hlo)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  return {
    "proc": proc,
    "hlo": {name: (hlo / f"{name}.hlo.txt").read_text() for name in RUNS},
    "row_split": json.loads((hlo / "row_split.json").read_text()),
  }


@pytest.mark.slow
def test_both_runs_match_one_process(result):
  proc = result["proc"]
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  lines = proc.stdout.splitlines()
  assert lines[-1] == "MATCH"
  assert f"{example.ROWS // 2} rows per process" in lines[0]  # rows over both
  for name in RUNS:
    (diff,) = [x for x in lines if x.startswith(f"{name}: max |param difference|")]
    assert float(diff.split("= ")[1].split(",")[0]) <= example.TOLERANCE
    (moved,) = [x for x in lines if x.startswith(f"{name}: largest change")]
    changes = [float(x.split()[-1]) for x in moved.split(": ")[2].split(", ")]
    assert len(changes) == 3 and min(changes) > 100 * example.TOLERANCE, moved


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.slow
def test_no_collective_moves_the_table_or_its_state(result, name):
  found = operands(result["hlo"][name])
  # The parser sees the batch's rows combined over the row shards.
  assert [c["op"] for c in collectives(result["hlo"][name])].count("all-reduce") >= 1
  # The table and each state leaf split like its rows, per device, from the state.
  split = result["row_split"][name]
  assert [SHARD_ROWS, example.DIM] in split and len(split) >= 4, split
  smallest = min(math.prod(shape) for shape in split)
  row_block_bytes = SHARD_ROWS * example.DIM * 4
  # At most the batch's rows and the sweep's, DIM entries each.
  bound = (IDS + SWEEP) * example.DIM
  assert bound * 8 < smallest * 4 <= row_block_bytes  # the distinction is clear
  for op, shapes in found:
    assert op in ("all-reduce", "all-gather"), (op, shapes)
    for shape in shapes:
      dims = _dims(shape)
      assert example.ROWS not in dims and SHARD_ROWS not in dims, (op, shape)
      elements = math.prod(dims)
      assert elements <= bound < smallest, (op, shape)
      assert elements * _itemsize(shape) < row_block_bytes, (op, shape)
      if op == "all-gather":  # only the data-parallel ids
        assert shape == f"s32[{IDS}]", (op, shape)
