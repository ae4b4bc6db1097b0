"""``SM3``: the braintools/brainstate-style optimizer object over :func:`optax_sm3.sm3`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3 import _sm3, _tree, _validation
from optax_sm3._brainstate import _checkpoint
from optax_sm3._brainstate._groups import ParamGroups
from optax_sm3._brainstate._rates import (
  ConstantLR,
  LRScheduler,
  attach,
  is_schedule,
  is_scheduler,
  nice_float,
)
from optax_sm3._brainstate._states import (
  Box,
  has_tracer,
  read,
  register_graph_node,
  traced_plain_mode_error,
)


class SM3(ParamGroups):
  r"""SM3 with the ``braintools.optim`` optimizer interface.

  A drop-in for ``braintools.optim.SM3`` (0.3.0): register a tree of
  ``brainstate.State`` objects, call :meth:`step` with gradients of the same
  structure, and the new values are written back into the states; learning
  rate schedulers, parameter groups (:meth:`add_param_group`) and
  :meth:`state_dict` work as there. Each parameter group runs its own
  :func:`optax_sm3.sm3` chain with coupled weight decay (group 0's is
  :attr:`tx`), so scalars, the :math:`O(\sum_r d_r)` memory and the speed
  come with it. For each parameter :math:`\theta` of shape
  :math:`(d_1, \dots, d_k)` with per-axis accumulators :math:`a_1, \dots,
  a_k` (one accumulator of the parameter's shape if :math:`k \le 1`), with
  the learning rate :math:`\eta` and weight decay :math:`\lambda` of its
  group:

  .. math::

    g &\leftarrow \mathrm{clip}(g) + \lambda \theta
      \quad\text{(clipping, coupled L2 weight decay)} \\
    \nu &= \min_r a_r + g^2, \qquad
    u = g / \sqrt{\nu + \epsilon} \quad (u = 0 \text{ where } \nu = 0) \\
    a_r &\leftarrow \max_{\text{axes} \ne r} \nu \\
    m &\leftarrow \mu m + (1 - \mu) u \quad\text{(if } \mu > 0) \\
    \theta &\leftarrow \theta - \eta\, m

  This is also what ``braintools.optim.SM3`` runs
  (``optax.scale_by_sm3(b1=momentum, b2=1.0)``: the paper's SM3-II with
  moving-average momentum), though its docstring shows
  :math:`V \leftarrow \max(V, G^2)`. Where the two differ:

  * groups added with :meth:`add_param_group` run SM3 here; braintools runs
    Adam on them whatever the optimizer;
  * ``param_groups[0]['lr'].value = x`` sets group 0's rate here; braintools
    ignores it (both honour :attr:`current_lr` and scheduler steps);
  * with ``momentum=0`` no momentum buffer is kept, and scalar parameters
    work (braintools keeps a full-size buffer and fails on scalars);
  * ``add_param_group`` takes ``lr`` and ``weight_decay`` only (braintools
    stores other keywords and ignores them), and a parameter may be in one
    group only;
  * :meth:`state_dict` does not hold parameter values, and
    :meth:`load_state_dict` checks the checkpoint before changing anything.

  As in braintools, clipping by ``grad_clip_norm`` uses each group's own
  gradient norm: every group behaves as a separate optimizer over its
  parameters.

  Without brainstate, :meth:`register_trainable_weights` also takes a plain
  pytree of arrays: the adapter then keeps the parameters itself
  (:attr:`param_states`) and :meth:`step` returns the new ones. That mode
  runs eagerly; calling it under ``jax.jit`` raises a ``TypeError`` that
  says to use :attr:`tx` as an optax optimizer instead.

  Args:
    lr: the learning rate :math:`\eta`: a float ``>= 0``, a braintools LR
      scheduler (``braintools.optim.StepLR(...)`` and friends; advance it
      with its own ``step()``, as in braintools), or an optax schedule (a
      callable from the step count to the rate).
    momentum: :math:`\mu` in ``[0, 1)``; ``0`` keeps no momentum buffer.
    eps: :math:`\epsilon \ge 0`, under the square root.
    weight_decay: :math:`\lambda \ge 0`, coupled (added to the gradient);
      the default for groups.
    grad_clip_norm: if set (``> 0``), clip each group's gradients to this
      global norm.
    grad_clip_value: if set (``> 0``), clip each gradient entry to
      ``[-grad_clip_value, grad_clip_value]``.

  Attributes:
    momentum, eps, weight_decay, grad_clip_norm, grad_clip_value: the
      hyperparameters as given.
    param_states: the registered tree, all groups together (of
      ``brainstate.State`` objects, or of the current arrays in plain
      mode); ``None`` before registration.
    param_groups: one dict per group, ``{'params': ..., 'lr': holder,
      'weight_decay': float}``; group 0 holds what
      :meth:`register_trainable_weights` registered. Set a group's rate with
      ``group['lr'].value = x`` and its weight decay with
      ``group['weight_decay'] = x`` (read at each eager step; under a jit,
      a new weight decay needs a new trace, a new rate does not).
    opt_state: a holder whose ``.value`` is group 0's optax state; ``None``
      before registration.
    param_groups_opt_states: holders of the optax states of groups 1, 2, ...
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
    >>> opt = optax_sm3.brainstate.SM3(lr=0.1).register_trainable_weights(params)
    >>> for _ in range(3):
    ...   params = opt.step(jax.grad(loss)(params))
    ...   print(f"loss {loss(params):.4f}")
    loss 2.7075
    loss 2.2736
    loss 1.7897
    >>> int(opt.step_count.value), opt.get_last_lr()
    (3, [0.1])

    A parameter group with its own rate: here ``lr=0`` freezes ``b``.

    >>> params = {"w": jnp.zeros((4, 3))}
    >>> opt = optax_sm3.brainstate.SM3(lr=0.1).register_trainable_weights(params)
    >>> opt.add_param_group({"b": jnp.zeros(3)}, lr=0.0)
    >>> grads = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    >>> new = opt.step(grads)
    >>> print(f"w {float(new['w'][0, 0]):.4f}, b {new['b']}")
    w -0.0100, b [0. 0. 0.]
    >>> [round(float(group["lr"].value), 6) for group in opt.param_groups]
    [0.1, 0.0]

  References:
    Anil et al., `Memory-Efficient Adaptive Optimization
    <https://arxiv.org/abs/1901.11150>`_, 2019
  """

  # brainstate.graph.Node's: attributes the graph engine leaves out.
  graph_invisible_attrs: tuple[str, ...] = ()

  def __init__(
    self,
    lr: float | optax.Schedule | LRScheduler = 1.0,
    momentum: float = 0.9,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip_norm: float | None = None,
    grad_clip_value: float | None = None,
  ):
    self._schedule = None
    self._current_lr = None
    # A scheduler, or the optax schedule (then also `_schedule`): the methods
    # that drive it as a scheduler check `_schedule` first, which pyright
    # cannot follow.
    scheduler: Any
    if is_scheduler(lr):
      scheduler = lr
    elif callable(lr):
      self._schedule = scheduler = lr
    else:
      _validation.check_range("lr", lr, low=0.0)
      scheduler = ConstantLR(lr)
    self._lr_scheduler = scheduler
    self._schedulers = []
    self.momentum = momentum
    self.eps = eps
    self.weight_decay = weight_decay
    self.grad_clip_norm = grad_clip_norm
    self.grad_clip_value = grad_clip_value
    self.param_states = None
    self.param_groups = []
    self.opt_state = None
    self.param_groups_opt_states = []
    self.step_count = Box(jnp.zeros([], jnp.int32))
    self._uses_states = False
    self._is_state = lambda _: False
    if self._schedule is None:
      self._base_lr = scheduler.base_lrs[0]
      attach(scheduler, self)
      self._current_lr = Box(jnp.asarray(scheduler.current_lrs.value[0], jnp.float32))
    else:
      self._base_lr = nice_float(self._schedule(0))
    self.default_tx()  # checks the hyperparameters
    register_graph_node(type(self))

  def check_valid_context(self, error_msg: Callable[[], str]) -> None:
    """Raises ``error_msg()`` if a State held here belongs to an ended trace.

    As ``brainstate.graph.Node.check_valid_context``; plain mode holds no
    States, so nothing to check there.
    """
    brainstate = sys.modules.get("brainstate")
    if brainstate is None:
      return
    register_graph_node(type(self))
    for _, value in brainstate.graph.iter_leaf(self):
      if isinstance(value, brainstate.State):
        value.check_valid_trace(error_msg)

  # Learning rate ------------------------------------------------------------

  @property
  def lr(self) -> LRScheduler | optax.Schedule:
    """The learning-rate scheduler (as braintools: same as :attr:`lr_scheduler`)."""
    return self._lr_scheduler

  @property
  def lr_scheduler(self) -> LRScheduler | optax.Schedule:
    """The scheduler driving group 0's rate.

    The braintools scheduler given as ``lr``; for a float ``lr``, a constant
    scheduler with the braintools ``LRScheduler`` interface (``step``,
    ``apply``, ``get_last_lr``, ``state_dict``, ...); for an optax schedule,
    the schedule itself.
    """
    return self._lr_scheduler

  @property
  def schedulers(self) -> list[LRScheduler]:
    """The schedulers added with :meth:`add_scheduler`."""
    return self._schedulers

  def add_scheduler(self, scheduler: LRScheduler) -> None:
    """Adds a scheduler whose rates :meth:`get_last_lr` reports (as braintools).

    As in braintools, an added scheduler does not drive the rate applied:
    pass the scheduler as ``lr`` for that.
    """
    self._schedulers.append(scheduler)

  @property
  def base_lr(self) -> jax.typing.ArrayLike:
    """The initial learning rate (the default rate of new groups)."""
    return self._base_lr

  @property
  def current_lr(self) -> jax.typing.ArrayLike:
    """Group 0's learning rate, the one the next :meth:`step` uses."""
    if self._schedule is not None:
      return self._schedule(self.step_count.value)
    return self._current_lr.value

  @current_lr.setter
  def current_lr(self, value: jax.typing.ArrayLike) -> None:
    if self._schedule is not None:
      raise TypeError(
        "`current_lr` cannot be set when `lr` is an optax schedule; pass a "
        "float or a braintools scheduler to set it by hand"
      )
    _validation.check_range("current_lr", value, low=0.0)
    self._current_lr.value = jnp.asarray(value, jnp.float32)
    # As braintools: the scheduler's first rate follows, the others stay.
    rates = list(self._lr_scheduler.current_lrs.value) or [0.0]
    rates[0] = float(np.asarray(value))
    self._lr_scheduler.current_lrs.value = rates

  def get_last_lr(self) -> Sequence[float | jax.Array]:
    """The rates of the last added scheduler, else ``[current_lr]``."""
    if self._schedulers:
      return self._schedulers[-1].get_last_lr()
    return [nice_float(self.current_lr)]

  def lr_apply(self, apply_fn: Callable[[float], float]) -> None:
    """Sets the rate to ``apply_fn`` of the scheduled rate (``lr.apply``).

    Raises:
      TypeError: if ``lr`` is an optax schedule.
    """
    if self._schedule is not None:
      raise TypeError("`lr_apply` needs a float or braintools scheduler `lr`")
    self._lr_scheduler.apply(apply_fn)

  # Transformations -----------------------------------------------------------

  def _make_tx(
    self,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: jax.typing.ArrayLike,
    name: str,
  ) -> optax.GradientTransformation:
    _validation.check_range(name, weight_decay, low=0.0)
    # The decay stage is kept even at 0, so the chain (and its state) keeps
    # one structure whatever the group's weight decay is set to later.
    return _sm3.sm3_with_weight_decay_stage(
      learning_rate,
      momentum=self.momentum,
      eps=self.eps,
      weight_decay=jnp.asarray(weight_decay, jnp.float32),
      weight_decay_mode="coupled",
      grad_clip_norm=self.grad_clip_norm,
      grad_clip_value=self.grad_clip_value,
    )

  def default_tx(self) -> optax.GradientTransformation:
    """The constructor's optimizer: :func:`optax_sm3.sm3`, coupled weight decay.

    Its learning rate is read at each update from :attr:`current_lr`'s
    holder (or the optax schedule), so setting the rate takes effect.
    """
    if self._schedule is not None:
      learning_rate = self._schedule
    else:
      learning_rate = lambda count: jnp.asarray(self._current_lr.value, jnp.float32)
    return self._make_tx(learning_rate, self.weight_decay, "weight_decay")

  def _group_tx(
    self, group: dict[str, Any], index: int
  ) -> optax.GradientTransformation:
    lr = group["lr"]
    if is_schedule(lr):
      learning_rate = lr
    else:
      _validation.check_range(f"param_groups[{index}]['lr']", read(lr), low=0.0)
      learning_rate = lambda count: jnp.asarray(read(group["lr"]), jnp.float32)
    return self._make_tx(
      learning_rate,
      read(group["weight_decay"]),
      f"param_groups[{index}]['weight_decay']",
    )

  @property
  def tx(self) -> optax.GradientTransformation:
    """Group 0's optax transformation (:meth:`default_tx` before registration)."""
    if not self.param_groups:
      return self.default_tx()
    return self._group_tx(self.param_groups[0], 0)

  # Steps ---------------------------------------------------------------------

  def _select(self, grads: Any, params: Any) -> Any:
    """``grads`` restricted to the keys of ``params`` (extra keys are ignored)."""
    if not isinstance(params, Mapping):
      return grads
    if not isinstance(grads, Mapping):
      raise TypeError(
        f"`grads` must be a mapping like the parameters, got {type(grads)}"
      )
    missing = [key for key in params if key not in grads]
    if missing:
      raise ValueError(f"`grads` lacks gradients for registered parameters {missing}")
    return {key: grads[key] for key in params}

  # Any: extra_args go to the optax `update` as they are (optax types them so).
  def step(self, grads: optax.Updates, **extra_args: Any) -> optax.Params:
    """Applies one SM3 update to every group and writes the new values back.

    Args:
      grads: gradients with the registered tree's structure (a State's
        gradient has the structure of its value); keys of no group are
        ignored.
      **extra_args: passed on to the optax ``update`` (as braintools does).

    Returns:
      The new parameter values, all groups together (also written into the
      states, or kept in :attr:`param_states` in plain mode).

    Raises:
      ValueError: if called before :meth:`register_trainable_weights`, or if
        ``grads`` lacks a registered parameter.
      TypeError: in plain mode, under a JAX transformation (use :attr:`tx`).
    """
    if self.opt_state is None:
      raise ValueError("register_trainable_weights must be called before step")
    if not self._uses_states and has_tracer(grads):
      raise traced_plain_mode_error("step")
    holders = [self.opt_state, *self.param_groups_opt_states]
    results = []
    for index, (group, holder) in enumerate(
      zip(self.param_groups, holders, strict=True)
    ):
      values = self._values(group["params"])
      updates, new_state = self._group_tx(group, index).update(
        self._select(grads, group["params"]), holder.value, values, **extra_args
      )
      results.append((optax.apply_updates(values, updates), new_state))
    if not self._uses_states and has_tracer(results):
      raise traced_plain_mode_error("step")
    for group, holder, (new_values, new_state) in zip(
      self.param_groups, holders, results, strict=True
    ):
      if self._uses_states:
        treedef = jax.tree.structure(group["params"], is_leaf=self._is_state)
        for state, value in zip(
          treedef.flatten_up_to(group["params"]),
          treedef.flatten_up_to(new_values),
          strict=True,
        ):
          state.value = value
      else:
        group["params"] = new_values
      holder.value = new_state
    self.param_states = self._all_params()
    self.step_count.value = self.step_count.value + 1
    return self._values(self.param_states)  # in plain mode, param_states itself

  def update(self, grads: optax.Updates, **extra_args: Any) -> optax.Params:
    """Same as :meth:`step` (the braintools ``Optimizer.update`` name)."""
    return self.step(grads, **extra_args)

  # Checkpoints ---------------------------------------------------------------

  def state_dict(self) -> dict[str, _tree.ArrayTree | None]:
    """The optimizer's state, in braintools' layout.

    Returns:
      ``{'step_count', 'lr', 'base_lr', 'param_groups':
      {'0': {'lr', 'weight_decay'}, '1': ...}, 'param_groups_opt_states':
      {'0': <group 1's optax state>, ...}, 'opt_state': <group 0's>}``.
      The parameters themselves are not included (checkpoint the model),
      nor a scheduler's own state (use its ``state_dict``), and a group
      whose ``lr`` is an optax schedule has no ``'lr'`` entry.
    """
    return _checkpoint.state_dict(self)

  # Any: a restored checkpoint, as braintools types it; every entry is
  # checked here before anything changes.
  def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
    """Restores what :meth:`state_dict` returned.

    Everything is checked before anything changes. Register the same
    parameters and add the same groups first, as in braintools.

    Args:
      state_dict: the mapping from :meth:`state_dict` (possibly after a
        serialisation round trip that turned tuples into other sequences).

    Raises:
      ValueError: if the checkpoint's groups or optimizer states do not
        match the registered ones (the message names the first mismatching
        leaf by its tree path, with both shapes), or a rate or weight decay
        is out of range.
      TypeError: in plain mode, under a JAX transformation.
    """
    if not self._uses_states and has_tracer(dict(state_dict)):
      raise traced_plain_mode_error("load_state_dict")
    restored, hyper = _checkpoint.checked(
      self, state_dict, restores_lr=self._schedule is None
    )

    self.step_count.value = jnp.asarray(state_dict["step_count"], jnp.int32)
    if self._schedule is None:
      if "base_lr" in state_dict:
        self._base_lr = state_dict["base_lr"]
      if "lr" in state_dict:
        self.current_lr = state_dict["lr"]
    for i, key, value in hyper:
      group = self.param_groups[i]
      if key == "weight_decay":
        group[key] = float(value)
      elif hasattr(group["lr"], "value"):
        group["lr"].value = jnp.asarray(value, jnp.float32)
    if restored is not None:
      holders = [self.opt_state, *self.param_groups_opt_states]
      for holder, value in zip(holders, restored, strict=False):
        holder.value = value
