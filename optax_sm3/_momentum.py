"""Exponential-moving-average momentum, as SM3's references use it."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sm3 import _layout, _tree, _validation


class ScaleByMomentumState(NamedTuple):
  """State of :func:`scale_by_momentum`.

  Attributes:
    momentum: a tree like the updates: the running average of the updates,
      each leaf of the parameter's shape, dtype ``mu_dtype`` (or the
      parameter's dtype when ``mu_dtype`` is ``None``); or ``None`` when
      ``momentum`` is ``None`` or a Python or NumPy 0 (no buffer is kept).
  """

  momentum: optax.Updates | None


def scale_by_momentum(
  momentum: jax.typing.ArrayLike | None = 0.9,
  *,
  nesterov: bool = False,
  mu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Replaces updates by their exponential moving average.

  .. math::

    m \leftarrow \mu m + (1 - \mu) u, \qquad
    \text{output} = m \text{ (or } \mu m + (1 - \mu) u
    \text{ with Nesterov)}

  the rule of ``optax.sm3`` and of the TensorFlow and PyTorch SM3 code (not
  optax's heavy-ball ``optax.trace``). The arithmetic runs in the wider of the
  update's and ``mu_dtype``; the buffer is stored in ``mu_dtype``.

  With :math:`\mu = 0` the output is the update itself, so no buffer is
  needed. Whether to keep one is decided when the transformation is built,
  from the argument's type, never from an array's value: ``None`` or a
  Python or NumPy number equal to 0 keeps none (the state's ``momentum`` is
  ``None``); any other number, and any JAX array (a hyperparameter injected
  by :func:`optax.inject_hyperparams`, a tracer under ``jax.jit``), keeps
  one, so that the value may change at run time. The state's structure is
  therefore the same eagerly and under ``jax.jit``; an injected ``0.0``
  keeps a buffer (the updates are those of no momentum), unless ``momentum``
  is listed in ``static_args``.

  Args:
    momentum: :math:`\mu` in ``[0, 1)`` or ``None`` (as 0); may be traced.
    nesterov: use Nesterov's look-ahead output.
    mu_dtype: dtype of the buffer (``jnp.bfloat16`` halves its memory);
      ``None`` keeps the parameter's dtype.

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`ScaleByMomentumState`.

  Raises:
    ValueError: if ``momentum`` is outside ``[0, 1)``; at ``update``, if the
      state has no buffer but this transformation keeps one (a state made
      with another ``momentum``).
    TypeError: if ``nesterov`` is not a bool, ``mu_dtype`` is not a real
      floating dtype, or (at ``init``) a parameter is not real floating.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_sm3
    >>> tx = optax_sm3.scale_by_momentum(0.5)
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.ones(2), state)
    >>> updates
    Array([0.5, 0.5], dtype=float32)

  References:
    Anil et al., `Memory-Efficient Adaptive Optimization
    <https://arxiv.org/abs/1901.11150>`_, 2019
  """
  if momentum is not None:
    _validation.check_range("momentum", momentum, low=0.0, high=1.0, high_open=True)
  nesterov = _validation.check_bool("nesterov", nesterov)
  mu_dtype = _validation.float_dtype("mu_dtype", mu_dtype)
  # Decided from the argument's type, so that jit and injection (which turn
  # numbers into arrays, or tracers) cannot change the state's structure.
  keeps_buffer = not _validation.is_static_zero(momentum)

  def init_fn(params):
    if not keeps_buffer:
      return ScaleByMomentumState(None)
    _validation.check_float_leaves(params, "scale_by_momentum")
    return ScaleByMomentumState(
      jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=mu_dtype or jnp.result_type(p)), params
      )
    )

  def update_fn(updates, state, params=None):
    del params
    if state.momentum is None:
      if keeps_buffer:
        raise ValueError(
          f"the state has no momentum buffer, but momentum={momentum!r} needs "
          "one: the state was made with momentum=0 or None (a Python number). "
          "Create it with this transformation's init (under "
          "optax.inject_hyperparams, a momentum of 0 keeps a buffer unless "
          "'momentum' is in static_args)"
        )
      return updates, state

    def step(u, m):
      u = jnp.asarray(u)
      dtype = jnp.promote_types(u.dtype, m.dtype)
      mu, one_minus_mu = _validation.complement(
        0.0 if momentum is None else momentum, dtype
      )
      uf = u.astype(dtype)
      m_new = mu * m.astype(dtype) + one_minus_mu * uf
      out = mu * m_new + one_minus_mu * uf if nesterov else m_new
      return out.astype(u.dtype), m_new.astype(m.dtype)

    outputs, momenta = _tree.unzip_pairs(
      updates, jax.tree.map(step, updates, state.momentum)
    )
    return outputs, ScaleByMomentumState(momenta)

  # The state's `momentum` may be None, which chex.ArrayTree (optax.OptState)
  # does not admit; optax types its own optional state trees the same way
  # (contrib's SAMState.cache: Optional[Params]).
  return optax.GradientTransformation(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


def _momentum_specs(state: Any, layout: _layout.ParamLayout) -> Any:
  """Sharding: a momentum of the parameters' structure is laid out like them."""
  if layout.is_params_like(state.momentum):
    return ScaleByMomentumState(layout.like_params(state.momentum))
  return _layout.replicated(state)


_layout.register(ScaleByMomentumState, _momentum_specs)
