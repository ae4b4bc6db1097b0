"""Exponential-moving-average momentum, as SM3's references use it."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sm3 import _tree, _validation


class ScaleByMomentumState(NamedTuple):
  """State of :func:`scale_by_momentum`.

  Attributes:
    momentum: a tree like the updates: the running average of the updates,
      each leaf of the parameter's shape, dtype ``mu_dtype`` (or the
      parameter's dtype when ``mu_dtype`` is ``None``); or ``None`` when
      ``momentum`` was 0 at ``init`` (no buffer is kept).
  """

  momentum: optax.Updates


def scale_by_momentum(
  momentum: Any = 0.9,
  *,
  nesterov: bool = False,
  mu_dtype: Any = None,
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
  needed. Whether to keep one is decided once, at ``init``, from the value
  ``momentum`` has then (``None`` or 0: no buffer, the state's ``momentum``
  is ``None``), and read back from the state at ``update``. So the state
  has the same structure and size whether ``momentum`` is a Python number or
  a hyperparameter injected by :func:`optax.inject_hyperparams`. A state
  made without a buffer cannot run a non-zero momentum later: ``update``
  raises a ``ValueError`` if the value is concrete, and a traced value that
  became non-zero (an injected hyperparameter changed at run time) raises
  when the step executes.

  Args:
    momentum: :math:`\mu` in ``[0, 1)`` or ``None`` (as 0); may be traced.
    nesterov: use Nesterov's look-ahead output.
    mu_dtype: dtype of the buffer (``jnp.bfloat16`` halves its memory);
      ``None`` keeps the parameter's dtype.

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`ScaleByMomentumState`.

  Raises:
    ValueError: if ``momentum`` is outside ``[0, 1)``; at ``update``, if a
      state kept no buffer but ``momentum`` is not 0.
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

  def init_fn(params):
    if _validation.concrete_zero(momentum):
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
      _validation.runtime_check_zero(
        momentum, "momentum", "no momentum buffer was allocated"
      )
      return updates, state

    def step(u, m):
      u = jnp.asarray(u)
      dtype = jnp.promote_types(u.dtype, m.dtype)
      mu, one_minus_mu = _validation.complement(momentum, dtype)
      uf = u.astype(dtype)
      m_new = mu * m.astype(dtype) + one_minus_mu * uf
      out = mu * m_new + one_minus_mu * uf if nesterov else m_new
      return out.astype(u.dtype), m_new.astype(m.dtype)

    outputs, momenta = _tree.unzip_pairs(
      updates, jax.tree.map(step, updates, state.momentum)
    )
    return outputs, ScaleByMomentumState(momenta)

  return optax.GradientTransformation(init_fn, update_fn)
