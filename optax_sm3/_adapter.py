"""``SM3``: the brainstate/braintools-style optimizer object over :func:`sm3`."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3 import _sm3, _validation

_INSTALL_HINT = "pip install 'optax-sm3[brainstate]'"


class _Box:
  """A mutable ``.value`` holder: the plain-pytree stand-in for a State."""

  def __init__(self, value: Any):
    self.value = value

  def __repr__(self) -> str:
    return f"_Box({self.value!r})"


def _state_class() -> type | None:
  """``brainstate.State`` if brainstate is already imported, else ``None``.

  A tree can only hold ``brainstate.State`` objects if brainstate has been
  imported, so looking in ``sys.modules`` needs no import of our own.
  """
  module = sys.modules.get("brainstate")
  return None if module is None else module.State


def _require_brainstate():
  try:
    import brainstate
  except ImportError as error:
    raise ImportError(
      "optax_sm3.SM3 was given objects that are not arrays; trees of "
      f"brainstate.State objects need brainstate ({_INSTALL_HINT})"
    ) from error
  return brainstate


def _is_array_like(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float))


def _is_scheduler(lr: Any) -> bool:
  """Whether ``lr`` looks like a braintools ``LRScheduler`` (duck-typed)."""
  return all(
    hasattr(lr, name) for name in ("current_lrs", "base_lrs", "get_lr", "step")
  )


class SM3:
  r"""SM3 with the ``braintools.optim`` optimizer interface.

  Code written for ``braintools.optim.SM3`` runs unchanged: register a tree
  of ``brainstate.State`` objects, call :meth:`step` with gradients of the
  same structure, and the new values are written back into the states. The
  arithmetic is :func:`optax_sm3.sm3` with coupled weight decay (available
  as :attr:`tx`), so scalars, the :math:`O(\sum_r d_r)` memory and the speed
  come with it. For each parameter :math:`\theta` of shape
  :math:`(d_1, \dots, d_k)` with per-axis accumulators :math:`a_1, \dots,
  a_k` (one accumulator of the parameter's shape if :math:`k \le 1`):

  .. math::

    g &\leftarrow \mathrm{clip}(g) + \lambda \theta
      \quad\text{(clipping, coupled L2 weight decay)} \\
    \nu &= \min_r a_r + g^2, \qquad
    u = g / \sqrt{\nu + \epsilon} \quad (u = 0 \text{ where } \nu = 0) \\
    a_r &\leftarrow \max_{\text{axes} \ne r} \nu \\
    m &\leftarrow \mu m + (1 - \mu) u \quad\text{(if } \mu > 0) \\
    \theta &\leftarrow \theta - \eta\, m

  (``braintools.optim.SM3`` documents :math:`V \leftarrow \max(V, G^2)`, a
  rule it does not run; the rule above is the paper's SM3-II, which both
  run.)

  Without brainstate, :meth:`register_trainable_weights` also takes a plain
  pytree of arrays: the adapter then keeps the parameters itself
  (:attr:`param_states`) and :meth:`step` returns the new ones. That mode
  runs eagerly; under ``jax.jit`` use :attr:`tx` as an optax optimizer.

  Args:
    lr: the learning rate :math:`\eta`: a float ``>= 0``, an optax schedule
      (a callable from the step count to the rate), or a braintools LR
      scheduler (``braintools.optim.StepLR(...)`` and friends; advance it
      with its own ``step()``, as in braintools).
    momentum: :math:`\mu` in ``[0, 1)``; ``0`` keeps no momentum buffer.
    eps: :math:`\epsilon \ge 0`, under the square root.
    weight_decay: :math:`\lambda \ge 0`, coupled (added to the gradient).
    grad_clip_norm: if set (``> 0``), clip gradients to this global norm.
    grad_clip_value: if set (``> 0``), clip each gradient entry to
      ``[-grad_clip_value, grad_clip_value]``.

  Attributes:
    momentum, eps, weight_decay, grad_clip_norm, grad_clip_value: the
      hyperparameters as given.
    tx: the underlying :func:`optax_sm3.sm3` transformation.
    param_states: the registered tree (of ``brainstate.State`` objects, or
      of the current arrays in plain mode); ``None`` before registration.
    opt_state: a holder whose ``.value`` is the optax state; ``None`` before
      registration.
    step_count: a holder whose ``.value`` counts the steps taken.

  Raises:
    ValueError: for a hyperparameter out of range (the message names it).
    TypeError: for an ``lr`` that is neither a number, a callable nor a
      scheduler.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax_sm3
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> def loss(p):
    ...   return jnp.sum((jnp.ones(4) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> opt = optax_sm3.SM3(lr=0.1).register_trainable_weights(params)
    >>> for _ in range(3):
    ...   params = opt.step(jax.grad(loss)(params))
    ...   print(f"loss {loss(params):.4f}")
    loss 2.7075
    loss 2.2736
    loss 1.7897
    >>> int(opt.step_count.value), opt.get_last_lr()
    (3, [0.1])

  References:
    Anil et al., `Memory-Efficient Adaptive Optimization
    <https://arxiv.org/abs/1901.11150>`_, 2019
  """

  def __init__(
    self,
    lr: Any = 1.0,
    momentum: float = 0.9,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip_norm: float | None = None,
    grad_clip_value: float | None = None,
  ):
    self._scheduler = None
    self._schedule = None
    if _is_scheduler(lr):
      self._scheduler = lr
      lr_holder = None
    elif callable(lr):
      self._schedule = lr
      lr_holder = None
    else:
      _validation.check_range("lr", lr, low=0.0)
      lr_holder = _Box(jnp.asarray(lr, jnp.float32))
    self._lr = lr
    self._lr_holder = lr_holder
    self.momentum = momentum
    self.eps = eps
    self.weight_decay = weight_decay
    self.grad_clip_norm = grad_clip_norm
    self.grad_clip_value = grad_clip_value
    self.tx = _sm3.sm3(
      self._learning_rate,
      momentum=momentum,
      eps=eps,
      weight_decay=weight_decay,
      weight_decay_mode="coupled",
      grad_clip_norm=grad_clip_norm,
      grad_clip_value=grad_clip_value,
    )
    self.param_states = None
    self.opt_state = None
    self.step_count = _Box(jnp.zeros([], jnp.int32))
    self._uses_states = False

  # Learning rate ------------------------------------------------------------

  def _learning_rate(self, count: jax.Array) -> jax.Array:
    """The rate used by :attr:`tx` at ``count`` (read live, so setting it works)."""
    if self._scheduler is not None:
      return jnp.asarray(self._scheduler.current_lrs.value[0], jnp.float32)
    if self._schedule is not None:
      return self._schedule(count)
    return self._lr_holder.value

  @property
  def lr(self) -> Any:
    """The learning rate as given: a float, a schedule or a scheduler."""
    return self._lr

  @property
  def base_lr(self) -> Any:
    """The initial learning rate."""
    if self._scheduler is not None:
      return self._scheduler.base_lrs[0]
    if self._schedule is not None:
      return self._schedule(0)
    return self._lr

  @property
  def current_lr(self) -> Any:
    """The learning rate the next :meth:`step` will use."""
    return self._learning_rate(self.step_count.value)

  @current_lr.setter
  def current_lr(self, value: Any) -> None:
    if self._schedule is not None:
      raise TypeError(
        "`current_lr` cannot be set when `lr` is an optax schedule; pass a "
        "float or a braintools scheduler to set it by hand"
      )
    _validation.check_range("current_lr", value, low=0.0)
    if self._scheduler is not None:
      # As braintools does: the scheduler's first rate is the one applied.
      rates = list(self._scheduler.current_lrs.value)
      rates[0] = float(value)
      self._scheduler.current_lrs.value = rates
    else:
      self._lr_holder.value = jnp.asarray(value, jnp.float32)

  def get_last_lr(self) -> list[Any]:
    """The current learning rate, in a list (the PyTorch convention)."""
    value = self.current_lr
    if isinstance(value, jax.core.Tracer):
      return [value]
    # The shortest decimal that rounds to the float32 rate: 0.1, not 0.1000000015.
    return [float(str(np.float32(value)))]

  # Registration and steps ----------------------------------------------------

  def _holder(self, value: Any) -> Any:
    if self._uses_states:
      return sys.modules["brainstate"].LongTermState(value)
    return _Box(value)

  def register_trainable_weights(self, param_states: Any) -> SM3:
    """Registers the parameters to train and initialises the optimizer state.

    Args:
      param_states: a pytree (e.g. ``model.states(brainstate.ParamState)``)
        whose leaves are ``brainstate.State`` objects, or, without
        brainstate, a pytree of arrays. A mapping is merged into one
        registered before, as braintools does.

    Returns:
      ``self``.

    Raises:
      ImportError: if the leaves are not arrays and brainstate is missing.
      TypeError: for leaves that are neither States nor arrays, or a tree
        mixing the two.
    """
    state_class = _state_class()
    is_state = (
      (lambda x: isinstance(x, state_class)) if state_class else (lambda _: False)
    )
    leaves = jax.tree.leaves(param_states, is_leaf=is_state)
    if not leaves:
      raise ValueError("`param_states` holds no parameters")
    states = [is_state(leaf) for leaf in leaves]
    if any(states) and not all(states):
      raise TypeError("`param_states` mixes brainstate.State objects and arrays")
    if not any(states) and not all(_is_array_like(leaf) for leaf in leaves):
      odd = next(type(leaf) for leaf in leaves if not _is_array_like(leaf))
      brainstate = _require_brainstate()
      raise TypeError(
        f"`param_states` leaves must be {brainstate.State.__name__} objects or "
        f"arrays, got {odd.__name__}"
      )
    uses_states = all(states)
    if isinstance(param_states, Mapping):
      param_states = dict(param_states)
      if isinstance(self.param_states, Mapping) and uses_states == self._uses_states:
        param_states = {**self.param_states, **param_states}
    if not uses_states:
      param_states = jax.tree.map(jnp.asarray, param_states)
    self._uses_states = uses_states
    self.param_states = param_states
    self._is_state = is_state
    self.opt_state = self._holder(self.tx.init(self._values()))
    self.step_count = self._holder(jnp.asarray(self.step_count.value, jnp.int32))
    if self._lr_holder is not None:
      self._lr_holder = self._holder(self._lr_holder.value)
    return self

  def _values(self) -> Any:
    if not self._uses_states:
      return self.param_states
    return jax.tree.map(lambda s: s.value, self.param_states, is_leaf=self._is_state)

  def _select(self, grads: Any) -> Any:
    """``grads`` restricted to the registered keys (extra keys are ignored)."""
    if not isinstance(self.param_states, Mapping):
      return grads
    if not isinstance(grads, Mapping):
      raise TypeError(
        f"`grads` must be a mapping like the parameters, got {type(grads)}"
      )
    missing = [key for key in self.param_states if key not in grads]
    if missing:
      raise ValueError(f"`grads` lacks gradients for registered parameters {missing}")
    return {key: grads[key] for key in self.param_states}

  def step(self, grads: Any) -> Any:
    """Applies one SM3 update and writes the new values back.

    Args:
      grads: gradients with the registered tree's structure (a State's
        gradient has the structure of its value).

    Returns:
      The new parameter values (also written into the states, or kept in
      :attr:`param_states` in plain mode).

    Raises:
      ValueError: if called before :meth:`register_trainable_weights`.
    """
    if self.opt_state is None:
      raise ValueError("register_trainable_weights must be called before step")
    values = self._values()
    updates, new_opt_state = self.tx.update(
      self._select(grads), self.opt_state.value, values
    )
    new_values = optax.apply_updates(values, updates)
    if self._uses_states:
      treedef = jax.tree.structure(self.param_states, is_leaf=self._is_state)
      state_leaves = treedef.flatten_up_to(self.param_states)
      for state, value in zip(
        state_leaves, treedef.flatten_up_to(new_values), strict=True
      ):
        state.value = value
    else:
      self.param_states = new_values
    self.opt_state.value = new_opt_state
    self.step_count.value = self.step_count.value + 1
    return new_values

  def update(self, grads: Any) -> Any:
    """Same as :meth:`step` (the braintools ``Optimizer.update`` name)."""
    return self.step(grads)

  # Checkpoints ---------------------------------------------------------------

  def state_dict(self) -> dict[str, Any]:
    """The optimizer's state: ``step_count``, ``lr``, ``base_lr``, ``opt_state``.

    The parameters themselves are not included (checkpoint the model), nor a
    braintools scheduler's own state (use its ``state_dict``), as in
    braintools.
    """
    lr = self.current_lr
    return {
      "step_count": self.step_count.value,
      "lr": lr,
      "base_lr": self.base_lr,
      "opt_state": None if self.opt_state is None else self.opt_state.value,
    }

  def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
    """Restores what :meth:`state_dict` returned.

    Args:
      state_dict: the mapping from :meth:`state_dict` (possibly after a
        serialisation round trip that turned tuples into other sequences).

    Raises:
      ValueError: if the saved optimizer state does not match the registered
        parameters.
    """
    self.step_count.value = jnp.asarray(state_dict["step_count"], jnp.int32)
    if self._schedule is None and "lr" in state_dict:
      self.current_lr = state_dict["lr"]
    saved = state_dict.get("opt_state")
    if saved is None:
      return
    if self.opt_state is None:
      raise ValueError(
        "register_trainable_weights must be called before load_state_dict"
      )
    template = self.opt_state.value
    saved_leaves = jax.tree.leaves(saved)
    template_leaves = jax.tree.leaves(template)
    if len(saved_leaves) != len(template_leaves) or any(
      np.shape(a) != np.shape(b)
      for a, b in zip(saved_leaves, template_leaves, strict=True)
    ):
      raise ValueError(
        "`state_dict['opt_state']` does not match the registered parameters: "
        f"{len(saved_leaves)} arrays saved, {len(template_leaves)} expected"
      )
    self.opt_state.value = jax.tree.unflatten(
      jax.tree.structure(template),
      [
        jnp.asarray(a, b.dtype)
        for a, b in zip(saved_leaves, template_leaves, strict=True)
      ],
    )
