"""Tests for optax_sm3._sharding: state shardings that follow the parameters.

The spec logic is tested here in the single-device process. Everything that
needs several devices (8 CPU devices, two processes) runs in subprocesses:
``tests/_sharding_worker.py`` once for all the mesh checks, and
``examples/multiprocess_train.py`` for the multi-process run.
"""

from __future__ import annotations

import itertools
import pathlib
import subprocess
import sys

import _subprocess
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sm3
from optax_sm3 import _cover, _sharding

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _sm3_specs(tx, params, specs):
  """The accumulator specs of the first ScaleBySM3State in the state."""
  state = optax_sm3.state_partition_specs(tx, params, specs)
  is_sm3 = lambda x: isinstance(x, optax_sm3.ScaleBySM3State)
  (found,) = [x for x in jax.tree.leaves(state, is_leaf=is_sm3) if is_sm3(x)]
  assert found.count == P()
  return found.accumulators


@pytest.mark.parametrize(
  ("shape", "spec", "expected"),
  [
    ((64, 16), P("x", None), (P("x"), P(None))),
    ((64, 16), P("x", "y"), (P("x"), P("y"))),
    ((16, 8), P(None, "y"), (P(None), P("y"))),
    ((16, 8), P("x"), (P("x"), P(None))),  # a short spec: trailing replicated
    ((16, 8), P(("x", "y"), None), (P(("x", "y")), P(None))),
    ((4, 6, 8), P(None, "a", "b"), (P(None), P("a"), P("b"))),
    ((2, 4, 6, 8), P("a", None, None, "b"), (P("a"), P(None), P(None), P("b"))),
    ((8,), P("x"), (P("x"),)),
    ((), P(), (P(),)),
  ],
)
def test_default_cover_follows_parameter_axes(shape, spec, expected):
  params = {"w": jnp.zeros(shape)}
  accs = _sm3_specs(optax_sm3.scale_by_sm3(), params, {"w": spec})
  assert accs["w"] == expected


def test_stacked_merged_and_unit_axes():
  params = {
    "stack": jnp.zeros((3, 4, 6)),
    "conv": jnp.zeros((3, 3, 16, 32)),
    "unit": jnp.zeros((4, 1, 8)),
  }
  specs = {
    "stack": P("s", "a", "b"),
    "conv": P(None, None, None, "m"),
    "unit": P("a", None, "b"),
  }
  tx = optax_sm3.scale_by_sm3(
    stacked_axes={"stack": 1, "conv": 0, "unit": 0},
    merge_axes_up_to=9,
    skip_unit_axes=True,
  )
  accs = _sm3_specs(tx, params, specs)
  assert accs["stack"] == (P("s", "a"), P("s", "b"))
  assert accs["conv"] == (P(None, None), P(None), P("m"))
  assert accs["unit"] == (P("a"), P("b"))


def _true_axes(cover):
  return [tuple(range(cover.stacked)) + group for group in cover.groups]


@pytest.mark.parametrize(
  "shape",
  [(5,), (5, 7), (5, 1, 7), (1, 5, 7), (5, 7, 1), (2, 3, 5, 7), (3, 3, 5, 7), (1, 1)],
)
def test_inferred_axes_reproduce_every_cover(shape):
  for stacked, merge, skip in itertools.product(
    range(len(shape) + 1), (None, 15, 35), (False, True)
  ):
    cover = _cover.make_cover(
      shape, stacked_axes=stacked, merge_axes_up_to=merge, skip_unit_axes=skip
    )
    acc_shapes = [cover.accumulator_shape(g) for g in cover.groups]
    axes = _sharding._accumulator_axes(shape, acc_shapes)
    assert axes is not None, (shape, stacked, merge, skip)
    assert [tuple(shape[a] for a in dims) for dims in axes] == acc_shapes
    if len(set(shape)) == len(shape) and 1 not in shape:
      # Distinct sizes: only one reading is possible, and it is the true one
      # (up to stacking a rank-1 remainder, which indexes the same axes).
      assert [set(d) for d in axes] == [set(d) for d in _true_axes(cover)]


def test_unmatched_accumulators_are_replicated():
  assert _sharding._accumulator_axes((4, 6), [(5,), (6,)]) is None
  assert _sharding._accumulator_axes((4, 6), [(4,), (4,)]) is None
  assert _sharding._accumulator_axes((4, 6), [(4,)]) is None  # 6 not covered


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sm3_chain(momentum):
  params = {"emb": jnp.zeros((64, 16)), "b": jnp.zeros(16), "s": jnp.zeros(())}
  specs = {"emb": P("x", None), "b": P("y"), "s": None}
  tx = optax_sm3.sm3(
    0.1, momentum=momentum, weight_decay=1e-4, grad_clip_norm=1.0, grad_clip_value=2.0
  )
  state = optax_sm3.state_partition_specs(tx, params, specs)
  assert jax.tree.structure(state, is_leaf=lambda x: isinstance(x, P)) == (
    jax.tree.structure(
      jax.tree.map(lambda _: P(), jax.eval_shape(tx.init, params)),
      is_leaf=lambda x: isinstance(x, P),
    )
  )
  accs = _sm3_specs(tx, params, specs)
  assert accs == {"emb": (P("x"), P(None)), "b": (P("y"),), "s": (P(),)}
  momenta = [
    x.momentum
    for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax_sm3.ScaleByMomentumState)
    )
    if isinstance(x, optax_sm3.ScaleByMomentumState)
  ]
  if momentum:
    assert momenta == [{"emb": P("x", None), "b": P("y"), "s": P()}]
  else:
    assert momenta == [None]  # momentum 0: the stage keeps no buffer
  specs_flat = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, P))
  assert all(isinstance(s, P) for s in specs_flat)


def test_other_optax_states_follow_parameters():
  params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
  specs = {"w": P(None, "m"), "b": P("m")}
  adam = optax.chain(optax.scale_by_adam(), optax_sm3.scale_by_sm3())
  state = optax_sm3.state_partition_specs(adam, params, specs)
  assert state[0].count == P()
  assert state[0].mu == specs and state[0].nu == specs
  assert state[1].accumulators == {"w": (P(None), P("m")), "b": (P("m"),)}
  # A single array as the parameters: leaves of its shape follow it.
  single = optax_sm3.state_partition_specs(
    optax_sm3.sm3(0.1), jnp.zeros((8, 4)), P("m", None)
  )
  assert single[0].count == P()
  assert single[0].accumulators == (P("m"), P(None))
  assert single[1].momentum == P("m", None)


def test_inject_hyperparams_and_masked():
  params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
  specs = {"w": P("m", None), "b": P()}
  tx = optax.inject_hyperparams(optax_sm3.sm3)(learning_rate=0.1, momentum=0.9)
  state = optax_sm3.state_partition_specs(tx, params, specs)
  assert all(v == P() for v in state.hyperparams.values())
  assert state.count == P()
  assert state.inner_state[0].accumulators["w"] == (P("m"), P(None))
  assert state.inner_state[1].momentum == specs
  masked = optax.masked(optax_sm3.scale_by_sm3(), {"w": True, "b": False})
  inner = optax_sm3.state_partition_specs(masked, params, specs).inner_state
  assert inner.accumulators["w"] == (P("m"), P(None))
  assert jax.tree.leaves(inner.accumulators["b"]) == []


def test_abstract_params_give_the_same_specs():
  params = {"w": jnp.zeros((8, 4), jnp.bfloat16), "b": jnp.zeros(4)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  specs = {"w": P("m", None), "b": P()}
  tx = optax_sm3.sm3(0.1)
  assert optax_sm3.state_partition_specs(
    tx, abstract, specs
  ) == optax_sm3.state_partition_specs(tx, params, specs)


def test_state_shardings_single_device_mesh():
  mesh = jax.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
  params = {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}
  shardings = {
    "w": NamedSharding(mesh, P("model", None)),
    "b": NamedSharding(mesh, P()),
  }
  tx = optax_sm3.sm3(0.1, momentum=0.9)
  out = optax_sm3.state_shardings(tx, params, shardings)
  assert all(s.mesh == mesh for s in jax.tree.leaves(out))
  assert out[0].accumulators["w"][0].spec == P("model")
  assert out[1].momentum["w"].spec == P("model", None)
  state = jax.jit(tx.init, out_shardings=out)(params)
  got = jax.tree.map(lambda x: x.sharding, state)
  assert jax.tree.leaves(got) == jax.tree.leaves(out)
  grads = jax.tree.map(jnp.ones_like, params)
  _, new_state = jax.jit(tx.update, out_shardings=(None, out))(grads, state, params)
  np.testing.assert_array_equal(new_state[0].accumulators["w"][0], np.ones(8))


def _mesh(name):
  return jax.make_mesh((1,), (name,), devices=jax.devices()[:1])


def test_bad_arguments():
  params = {"w": jnp.zeros((8, 4))}
  tx = optax_sm3.sm3(0.1)
  with pytest.raises(ValueError, match="param_specs"):
    optax_sm3.state_partition_specs(tx, params, {"v": P()})
  with pytest.raises(TypeError, match="param_specs"):
    optax_sm3.state_partition_specs(tx, params, {"w": ("x", None)})
  with pytest.raises(ValueError, match=r"param_specs.*rank 2"):
    optax_sm3.state_partition_specs(tx, params, {"w": P("x", None, None)})
  with pytest.raises(TypeError, match="param_shardings"):
    optax_sm3.state_shardings(tx, params, {"w": P("x")})
  with pytest.raises(ValueError, match="param_shardings"):
    optax_sm3.state_shardings(tx, params, [NamedSharding(_mesh("x"), P())])
  two = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
  meshes = [_mesh("x"), _mesh("y")]
  with pytest.raises(ValueError, match="one mesh"):
    optax_sm3.state_shardings(
      tx, two, {"w": NamedSharding(meshes[0], P()), "b": NamedSharding(meshes[1], P())}
    )


# ---------------------------------------------------------------------------
# 8 CPU devices, in one subprocess.

_RUNS = ["8/0.0", "8/0.9", "4x2/0.0", "4x2/0.9"]


@pytest.fixture(scope="module")
def multi_device():
  return _subprocess.run_json_worker("_sharding_worker.py")


@pytest.mark.parametrize("run", _RUNS)
def test_sharded_training_matches_single_device(multi_device, run):
  result = multi_device[run]
  for name, diff in result["max_diff"].items():
    assert diff < 2e-5, (name, diff)
    assert result["moved"][name] > 1e-2, name  # the comparison is not vacuous
  assert result["types_stable"]
  accs = result["state_specs"]
  if run.startswith("8"):
    assert accs["emb"] == ["P('x',)", "P(None,)"]
    assert accs["kernel"] == ["P(None,)", "P('x',)"]
  else:
    assert accs["emb2"] == ["P('x',)", "P('y',)"]
    assert accs["kernel"] == ["P(None,)", "P('y',)"]
  assert accs["bias"] == ["P(None,)"] and accs["scale"] == ["P()"]
  if run.endswith("0.9"):
    assert result["momentum_specs"]["emb"] == "P('x', None)"
  else:
    assert result["momentum_specs"] is None


@pytest.mark.parametrize("run", _RUNS)
def test_per_device_state_bytes_are_the_expected_share(multi_device, run):
  result = multi_device[run]
  assert len(result["bytes"]) == 8
  assert set(result["bytes"].values()) == {result["expected_bytes"]}
  assert result["expected_bytes"] < result["replicated_bytes"]


@pytest.mark.parametrize("run", _RUNS)
def test_no_full_parameter_is_gathered(multi_device, run):
  result = multi_device[run]
  found = result["collectives"]
  # The per-axis maxima over a sharded axis must be reduced across devices.
  assert any(c["op"] == "all-reduce" for c in found), found
  assert not [c for c in found if c["op"] == "all-gather"], found
  largest = max(c["elements"] for c in found)
  assert largest <= result["max_accumulator_elements"], found
  assert largest < result["min_sharded_param_elements"], found


def test_hlo_check_sees_a_full_gather(multi_device):
  # The parser behind test_no_full_parameter_is_gathered does find one.
  assert {"op": "all-gather", "elements": 64 * 16} in multi_device["control"]


def test_explicit_sharding_mode(multi_device):
  result = multi_device["explicit"]
  assert result["after_init"] == result["after_update"]
  assert result["after_init"] == result["after_jit_update"]
  assert result["after_init"] == result["after_jit_steps"]
  assert "float32[64@x]" in result["sharded_types"]
  assert "float32[32@x,16@y]" in result["sharded_types"]
  assert result["max_diff"] < 2e-5


@pytest.mark.slow
def test_multiprocess_example_matches_single_process():
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / "examples" / "multiprocess_train.py"),
      "--steps",
      "3",
      "--timeout",
      "150",
    ],
    env=_subprocess.cpu_env(),
    capture_output=True,
    text=True,
    timeout=200,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  assert "MATCH" in proc.stdout.splitlines()[-1]
  assert proc.stdout.splitlines()[-1] == "MATCH"
