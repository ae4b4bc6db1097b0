"""What an optimizer made by sm3 says it is (the sparse path's one source)."""

import inspect

import jax.numpy as jnp
import optax

import optax_sm3
from optax_sm3 import _scale_by_sm3, _sm3


def test_spec_fields_are_sm3s_arguments():
  params = set(inspect.signature(optax_sm3.sm3).parameters)
  assert set(_sm3.SM3Spec._fields) == params | {"stages"}
  assert set(_scale_by_sm3.PARAMETERS) <= params
  assert tuple(_scale_by_sm3.PARAMETERS) == tuple(
    inspect.signature(_scale_by_sm3.scale_by_sm3).parameters
  )


def test_spec_records_the_call_and_the_chains_own_stages():
  schedule = optax.linear_schedule(0.1, 0.0, 10)
  opt = optax_sm3.sm3(
    schedule, 0.5, 0.9, bias_correction=True, grad_clip_norm=1.0, weight_decay=0.1
  )
  spec = _sm3.spec_of(opt)
  assert spec.learning_rate is schedule
  assert (spec.momentum, spec.beta, spec.bias_correction) == (0.5, 0.9, True)
  assert len(spec.stages.clip) == 1
  assert spec.stages.coupled_decay is None
  # The chain is the stages, in order: the same updates.
  params = {"w": jnp.ones((3, 2))}
  grads = {"w": jnp.arange(6.0).reshape(3, 2)}
  chained = optax.chain(*spec.stages.chain())
  want, _ = opt.update(grads, opt.init(params), params)
  got, _ = chained.update(grads, chained.init(params), params)
  assert bool(jnp.all(got["w"] == want["w"]))


def test_the_recipe_has_a_spec_and_other_transformations_do_not():
  assert _sm3.spec_of(optax_sm3.sm3_recipe(1e-2, 100)).beta == 0.99
  assert _sm3.spec_of(optax.adam(1e-3)) is None
  assert _sm3.spec_of(optax.chain(optax_sm3.sm3(0.1))) is None
  assert _sm3.spec_of(optax.inject_hyperparams(optax_sm3.sm3)(0.1)) is None
  assert _sm3.spec_of(0.1) is None


def test_copies_of_the_optimizer_keep_their_spec():
  opt = optax_sm3.sm3(0.1)
  assert _sm3.spec_of(opt._replace()) is _sm3.spec_of(opt)
  assert _sm3.spec_of(optax.GradientTransformation(*opt)) is _sm3.spec_of(opt)
