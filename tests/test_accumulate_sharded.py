"""The CPU loop on sharded parameters (optax_sm3._partitioned), on 8 devices.

Everything runs in one subprocess (``tests/_accumulate_sharded_worker.py``)
that starts JAX with 8 CPU devices; the assertions are here.
"""

from __future__ import annotations

import _subprocess
import pytest

_CASES = ("rows", "columns", "2d/bf16", "replicated/sm3-I")
# Cases run with the worker's small block (2**12 entries, 2**9 per device);
# "columns" keeps the default block.
_SMALL_BLOCK = ("rows", "2d/bf16", "replicated/sm3-I")


@pytest.fixture(scope="module")
def multi_device():
  return _subprocess.run_json_worker("_accumulate_sharded_worker.py")


@pytest.mark.parametrize("case", _CASES)
@pytest.mark.slow
def test_bit_identical_to_the_direct_form(multi_device, case):
  result = multi_device[case]
  # Parameters and state, against block_size=0 on the same mesh.
  assert result["same_as_direct_on_mesh"]
  # The accumulators, against the direct form on one device.
  assert result["accumulators_same_as_one_device"]
  # The parameters differ at most by the rounding of the update's arithmetic,
  # which XLA fuses differently in a single-device program.
  assert result["params_diff_to_one_device"] < 2e-5
  assert result["params_moved"] > 1e-2  # the comparison is not vacuous
  assert result["state_specs_kept"]


@pytest.mark.parametrize("case", _CASES)
@pytest.mark.slow
def test_each_shard_is_looped(multi_device, case):
  result = multi_device[case]
  assert result["loops"] == 3  # emb, conv, stack; not the bias
  assert result["direct_loops"] == 0


@pytest.mark.parametrize("case", _CASES)
@pytest.mark.slow
def test_no_parameter_is_gathered(multi_device, case):
  result = multi_device[case]
  found = result["collectives"]
  assert not [c for c in found if c[0] != "all-reduce"], found
  assert all(size <= result["max_accumulator_elements"] for _, size in found), found
  if case.startswith("replicated"):
    assert not found
  else:
    assert found  # the maxima over split axes are combined across devices


@pytest.mark.parametrize("case", _SMALL_BLOCK)
@pytest.mark.slow
def test_temporary_is_a_small_fraction_of_the_shard(multi_device, case):
  result = multi_device[case]
  assert result["temp_bytes"] <= 0.05 * result["param_bytes_per_device"], result


@pytest.mark.slow
def test_direct_form_would_fail_the_temporary_check(multi_device):
  # The control: without the loop each device materialises nu for its shard.
  rows = multi_device["rows"]
  assert rows["direct_temp_bytes"] >= 0.5 * rows["param_bytes_per_device"]


@pytest.mark.slow
def test_default_block_is_shared_by_the_devices(multi_device):
  # 2**20 entries per block on the host: 2**17 per device, and at most half
  # the largest shard (the (4096, 256) embedding split 8 ways by columns).
  block = min(2**20 // 8, 4096 * 256 // 8 // 2)
  columns = multi_device["columns"]
  assert columns["temp_bytes"] <= 1.5 * 4 * block, columns
  assert columns["temp_bytes"] < columns["direct_temp_bytes"] / 2, columns


@pytest.mark.slow
def test_explicit_sharding_mode(multi_device):
  result = multi_device["explicit"]
  assert result["accumulators_same_as_one_device"]
  assert result["types_kept"]
  assert result["collectives"]
  assert not [c for c in result["collectives"] if c[0] != "all-reduce"]


@pytest.mark.parametrize(
  "name", ["jit", "vmap", "scan", "grad", "shard_map", "shard_map/partial"]
)
@pytest.mark.slow
def test_transforms(multi_device, name):
  result = multi_device["transforms"][name]
  # Under a shard_map over some of the mesh axes: the direct form.
  assert result["loops"] == (name != "shard_map/partial")
  assert result["accumulators_same"]
  assert result["rest_diff"] < 1e-5
