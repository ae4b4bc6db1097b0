"""Tests for optax_sm3.SM3, the brainstate/braintools-style adapter."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3

brainstate = pytest.importorskip("brainstate")
braintools = pytest.importorskip("braintools")


@pytest.fixture(autouse=True)
def _allow_rank_promotion():
  # brainstate.nn.Linear adds its (d,) bias to (n, d) activations.
  with jax.numpy_rank_promotion("allow"):
    yield


_X = jax.random.normal(jax.random.key(0), (16, 3))
_Y = jax.random.normal(jax.random.key(1), (16, 2))


def _mlp():
  brainstate.random.seed(0)
  return brainstate.nn.Sequential(
    brainstate.nn.Linear(3, 8), brainstate.nn.ReLU(), brainstate.nn.Linear(8, 2)
  )


def _linear():
  brainstate.random.seed(1)
  return brainstate.nn.Linear(3, 2)


def _params(model):
  return model.states(brainstate.ParamState)


def _values(model):
  return {k: s.value for k, s in _params(model).items()}


def _set_values(model, values):
  for k, s in _params(model).items():
    s.value = values[k]


def _train_step(model, opt):
  def loss():
    return jnp.mean((model(_X) - _Y) ** 2)

  @brainstate.transform.jit
  def step():
    grads, value = brainstate.transform.grad(loss, _params(model), return_value=True)()
    opt.step(grads)
    return value

  return step


def _reference(model, tx, steps, lrs=None):
  """Runs ``tx`` functionally from the model's current values; returns them."""
  states = _params(model)
  values = _values(model)
  opt_state = tx.init(values)
  for _ in range(steps):
    _set_values(model, values)
    grads = brainstate.transform.grad(lambda: jnp.mean((model(_X) - _Y) ** 2), states)()
    updates, opt_state = tx.update(grads, opt_state, values)
    values = optax.apply_updates(values, updates)
  return values


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol, atol), a, b)


@pytest.mark.parametrize("make_model", [_linear, _mlp], ids=["linear", "mlp"])
def test_training_reduces_loss_and_writes_back(make_model):
  model = make_model()
  before = _values(model)
  opt = optax_sm3.SM3(lr=0.1)
  assert opt.register_trainable_weights(_params(model)) is opt
  step = _train_step(model, opt)
  losses = [float(step()) for _ in range(30)]
  assert losses[-1] < 0.5 * losses[0]
  after = _values(model)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed))
  assert int(opt.step_count.value) == 30


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"momentum": 0.0},
    {"momentum": 0.5, "weight_decay": 1e-2, "eps": 1e-6},
    {"grad_clip_norm": 0.1, "grad_clip_value": 0.05},
  ],
)
def test_updates_equal_sm3_chain(kwargs):
  model = _mlp()
  init = _values(model)
  tx = optax_sm3.sm3(0.05, weight_decay_mode="coupled", **kwargs)
  expected = _reference(model, tx, 6)
  _set_values(model, init)
  opt = optax_sm3.SM3(lr=0.05, **kwargs).register_trainable_weights(_params(model))
  step = _train_step(model, opt)
  for _ in range(6):
    step()
  _assert_trees_close(_values(model), expected)


def test_matches_braintools_sm3():
  # braintools runs optax.scale_by_sm3, which for rank >= 1 is SM3-II as ours.
  results = []
  for cls in (optax_sm3.SM3, braintools.optim.SM3):
    model = _mlp()
    opt = cls(lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt.register_trainable_weights(_params(model))
    step = _train_step(model, opt)
    for _ in range(10):
      step()
    results.append(_values(model))
  _assert_trees_close(*results, rtol=1e-5, atol=1e-6)


def test_momentum_zero_keeps_no_buffer():
  model = _mlp()
  with_momentum = optax_sm3.SM3(lr=0.1).register_trainable_weights(_params(model))
  without = optax_sm3.SM3(lr=0.1, momentum=0.0)
  without.register_trainable_weights(_params(model))
  size = lambda opt: sum(x.size for x in jax.tree.leaves(opt.opt_state.value))
  n_params = sum(x.size for x in jax.tree.leaves(_values(model)))
  assert size(with_momentum) - size(without) == n_params
  assert size(without) < n_params


def test_optax_schedule_lr():
  schedule = optax.linear_schedule(0.1, 0.0, 4)
  model = _linear()
  init = _values(model)
  expected = _reference(model, optax_sm3.sm3(schedule, weight_decay_mode="coupled"), 3)
  _set_values(model, init)
  opt = optax_sm3.SM3(lr=schedule).register_trainable_weights(_params(model))
  assert opt.lr is schedule
  step = _train_step(model, opt)
  for _ in range(3):
    step()
  _assert_trees_close(_values(model), expected)
  np.testing.assert_allclose(opt.get_last_lr(), [0.025], rtol=1e-6)
  with pytest.raises(TypeError, match="current_lr"):
    opt.current_lr = 0.5


def test_braintools_scheduler_lr_takes_effect_inside_jit():
  scheduler = braintools.optim.StepLR(base_lr=0.1, step_size=1, gamma=0.5)
  model = _linear()
  init = _values(model)
  lrs = [0.1, 0.05, 0.025]
  tx = optax_sm3.sm3(lambda count: jnp.asarray(lrs)[count], weight_decay_mode="coupled")
  expected = _reference(model, tx, 3)
  _set_values(model, init)
  opt = optax_sm3.SM3(lr=scheduler).register_trainable_weights(_params(model))
  assert opt.lr is scheduler and opt.base_lr == 0.1
  step = _train_step(model, opt)
  for lr in lrs:
    np.testing.assert_allclose(opt.get_last_lr(), [lr])
    step()
    scheduler.step()
  _assert_trees_close(_values(model), expected)
  opt.current_lr = 0.3
  assert scheduler.get_last_lr()[0] == 0.3


def test_current_lr_setter_takes_effect_inside_jit():
  model = _linear()
  opt = optax_sm3.SM3(lr=0.1).register_trainable_weights(_params(model))
  step = _train_step(model, opt)
  step()
  opt.current_lr = 0.0
  frozen = _values(model)
  step()
  jax.tree.map(np.testing.assert_array_equal, _values(model), frozen)
  assert opt.get_last_lr() == [0.0]
  opt.current_lr = 0.1
  step()
  assert jnp.any(_values(model)[("weight",)]["weight"] != frozen[("weight",)]["weight"])


def test_state_dict_round_trip_resumes_identically():
  model = _mlp()
  opt = optax_sm3.SM3(lr=0.1, momentum=0.9).register_trainable_weights(_params(model))
  step = _train_step(model, opt)
  for _ in range(3):
    step()
  saved_params, saved = _values(model), opt.state_dict()
  assert int(saved["step_count"]) == 3 and saved["lr"] == pytest.approx(0.1)
  for _ in range(3):
    step()
  uninterrupted = _values(model)

  resumed_model = _mlp()
  _set_values(resumed_model, saved_params)
  resumed = optax_sm3.SM3(lr=0.1, momentum=0.9)
  resumed.register_trainable_weights(_params(resumed_model))
  resumed.load_state_dict(saved)
  assert int(resumed.step_count.value) == 3
  resumed_step = _train_step(resumed_model, resumed)
  for _ in range(3):
    resumed_step()
  jax.tree.map(np.testing.assert_array_equal, _values(resumed_model), uninterrupted)


def test_load_state_dict_rejects_other_shapes():
  opt = optax_sm3.SM3(lr=0.1).register_trainable_weights(_params(_mlp()))
  other = optax_sm3.SM3(lr=0.1).register_trainable_weights(_params(_linear()))
  with pytest.raises(ValueError, match="opt_state"):
    opt.load_state_dict(other.state_dict())


def test_plain_pytree_equals_sm3_and_accepts_scalars():
  params = {"s": jnp.asarray(2.0), "v": jnp.arange(3.0), "w": jnp.ones((4, 3))}
  grads = [jax.tree.map(lambda p, i=i: jnp.sin(p + i), params) for i in range(4)]
  tx = optax_sm3.sm3(0.1, weight_decay=0.01, weight_decay_mode="coupled")
  expected, state = params, tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, expected)
    expected = optax.apply_updates(expected, updates)
  opt = optax_sm3.SM3(lr=0.1, weight_decay=0.01).register_trainable_weights(params)
  for g in grads:
    got = opt.step({**g, "unused": jnp.zeros(2)})  # extra keys are ignored
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  jax.tree.map(np.testing.assert_array_equal, opt.param_states, expected)
  with pytest.raises(ValueError, match="lacks gradients"):
    opt.update({"v": jnp.zeros(3)})


def test_errors():
  with pytest.raises(ValueError, match="register_trainable_weights"):
    optax_sm3.SM3().step({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="`lr` must be in"):
    optax_sm3.SM3(lr=-1.0)
  with pytest.raises(TypeError, match="`lr`"):
    optax_sm3.SM3(lr="fast")
  with pytest.raises(ValueError, match="`momentum` must be in"):
    optax_sm3.SM3(momentum=1.0)
  with pytest.raises(ValueError, match="`eps`"):
    optax_sm3.SM3(eps=-1.0)
  with pytest.raises(ValueError, match="`weight_decay`"):
    optax_sm3.SM3(weight_decay=-0.1)
  with pytest.raises(ValueError, match="`grad_clip_norm`"):
    optax_sm3.SM3(grad_clip_norm=0.0)
  with pytest.raises(TypeError, match="mixes"):
    optax_sm3.SM3().register_trainable_weights(
      {"a": brainstate.ParamState(jnp.zeros(2)), "b": jnp.zeros(2)}
    )
  with pytest.raises(TypeError, match="leaves must be State objects"):
    optax_sm3.SM3().register_trainable_weights({"a": object()})


def test_without_brainstate():
  code = textwrap.dedent(
    """
    import sys
    sys.modules["brainstate"] = None  # makes `import brainstate` fail
    import jax.numpy as jnp
    import optax_sm3
    opt = optax_sm3.SM3(lr=0.5).register_trainable_weights({"w": jnp.ones((2, 2))})
    new = opt.step({"w": jnp.ones((2, 2))})
    print(float(new["w"][0, 0]))
    try:
      optax_sm3.SM3().register_trainable_weights({"w": object()})
    except ImportError as error:
      print("ImportError", error)
    """
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True
  ).stdout
  first, second = out.splitlines()
  # One step: u = g / sqrt(g^2 + eps) ~ 1, momentum 0.9 averages it to 0.1.
  assert float(first) == pytest.approx(1.0 - 0.5 * 0.1, rel=1e-5)
  assert second.startswith("ImportError") and "optax-sm3[brainstate]" in second


def test_importing_optax_sm3_does_not_import_brainstate():
  code = "import sys, optax_sm3; print('brainstate' in sys.modules)"
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True
  ).stdout
  assert out.strip() == "False"
