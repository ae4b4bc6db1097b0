"""The SM3 preconditioner as an optax ``GradientTransformation``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3 import _accumulate, _blocks, _boxes, _cover, _layout, _tree, _validation

_VARIANTS = ("II", "I")
PARAMETERS = (  # The keyword arguments, in order.
  "beta",
  "bias_correction",
  "eps",
  "variant",
  "accumulator_dtype",
  "stacked_axes",
  "merge_axes_up_to",
  "skip_unit_axes",
  "block_size",
)

PerParam = int | _tree.TreeOrFunction


class ScaleBySM3State(NamedTuple):
  """State of :func:`scale_by_sm3`.

  Attributes:
    count: number of updates applied so far; shape ``()``, dtype ``int32``.
    accumulators: a tree with the parameters' structure whose leaf for each
      parameter is a tuple of arrays, one per group of its cover. For the
      default cover of a parameter of shape ``(d_1, ..., d_k)``, ``k >= 2``,
      the tuple holds ``k`` vectors of shapes ``(d_1,), ..., (d_k,)``; for a
      parameter of rank 0 or 1 it holds one array of the parameter's shape.
      Stacked (batch) axes lead every accumulator's shape. Dtype
      ``accumulator_dtype`` (float32 by default, whatever the parameters').
  """

  count: jax.Array
  accumulators: optax.Updates


def _static_int(value: Any, name: str) -> int:
  """A structural integer option as a Python int (never a traced value)."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"`{name}` fixes the state's shapes and cannot be traced; with "
      f"optax.inject_hyperparams pass static_args=({name!r},)"
    )
  if isinstance(value, bool) or not jnp.issubdtype(
    jnp.asarray(value).dtype, jnp.integer
  ):
    raise TypeError(f"`{name}` must be an int, got {value!r}")
  return int(value)


def per_param(
  option: PerParam | None, tree: optax.Params, name: str
) -> _tree.ArrayTree:
  """Broadcasts a per-parameter option to a tree with ``tree``'s structure."""
  if option is None:
    option = 0
  # optax's rule: a function is called, a tree of ints (an Equinox module of
  # ints is callable too) is a tree.
  option = _tree.resolve(option, tree)
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(option)):
    value = _static_int(option, name)
    return jax.tree.map(lambda _: value, tree)
  try:
    return jax.tree.map(lambda _, value: _static_int(value, name), tree, option)
  except ValueError as error:
    raise ValueError(
      f"`{name}` must be an int, a tree matching the parameters, or a "
      f"callable returning one: {error}"
    ) from None


def _accumulator_dtype(param_dtype, accumulator_dtype) -> jnp.dtype:
  if accumulator_dtype is not None:
    return jnp.dtype(accumulator_dtype)
  # float32 at least: bf16/f16 running sums stop growing once they are large.
  return jnp.promote_types(param_dtype, jnp.float32)


def _reject_optax_style(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
  """Explains why a call written for ``optax.scale_by_sm3`` is refused."""
  translation = (
    "optax.scale_by_sm3(b1, b2, eps) takes momentum b1 first and its "
    "second-moment decay b2 (1.0 = sums) second; here every argument is a "
    "keyword, and the same transformation is "
    "optax.chain(optax_sm3.scale_by_sm3(beta=0.0 if b2 == 1 else b2, eps=eps), "
    "optax_sm3.scale_by_momentum(b1)) (or optax_sm3.sm3(learning_rate, "
    "momentum=b1, beta=..., eps=eps) for the whole optimizer)"
  )
  if args:
    raise TypeError(
      f"scale_by_sm3 takes keyword arguments only (beta=, eps=, ...), got "
      f"{len(args)} positional: {args!r}. {translation}."
    )
  names = ", ".join(sorted(kwargs))
  raise TypeError(
    f"scale_by_sm3 got unexpected keyword arguments: {names}. {translation}."
  )


def _reject_complex(params: optax.Params) -> None:
  _validation.check_float_leaves(params, "scale_by_sm3")


def _check_shapes(path, g, accumulators, cover: _cover.Cover) -> None:
  """Raises if ``g``'s shape does not match the state's accumulators."""
  expected = tuple(cover.accumulator_shape(group) for group in cover.groups)
  actual = tuple(tuple(a.shape) for a in accumulators)
  if expected != actual:
    raise ValueError(
      f"gradient at {jax.tree_util.keystr(path)} has shape {tuple(g.shape)}, "
      f"which needs accumulators of shapes {expected}, but the state holds "
      f"{actual}: the state was made for a parameter of another shape"
    )


def coefficients(
  beta: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike
) -> tuple[jax.Array, jax.Array]:
  """``(c_old, c_new)`` with ``nu = c_old * old + c_new * g**2``.

  ``beta == 0`` is the sum (``1, 1``), ``0 < beta < 1`` the moving average
  (``beta, 1 - beta``). A select on the scalar, not a Python ``if``, so that a
  traced ``beta`` works.
  """
  beta, one_minus_beta = _validation.complement(beta, dtype)
  is_sum = beta == 0
  one = jnp.ones([], dtype)
  return jnp.where(is_sum, one, beta), jnp.where(is_sum, one, one_minus_beta)


def precondition(
  g: jax.Array,
  accumulators: tuple[jax.Array, ...],
  cover: _cover.Cover,
  c_old: jax.Array,
  c_new: jax.Array,
  eps: jax.Array,
  variant: str,
  block_size: int,
  correction: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """One SM3 step for one parameter: returns ``(update, new_accumulators)``.

  ``correction`` (bias correction) multiplies the estimate the update is
  scaled by, never the accumulators kept.
  """
  new = _accumulate.new_accumulators(
    g, accumulators, cover, c_old, c_new, variant, block_size
  )
  # SM3-II scales by the estimate built from the old accumulators, SM3-I by
  # the minimum of the new ones.
  shapes = [cover.broadcast_shape(group) for group in cover.groups]
  if variant == "II":
    nu = _blocks.estimate(g, accumulators, shapes, c_old, c_new)
  else:
    nu = jnp.broadcast_to(_blocks.cover_minimum(new, shapes), g.shape)
  if correction is not None:
    nu = nu * correction
  return _accumulate.scaled_update(g, nu, eps), new


def bias_correction_factor(beta: jax.Array, count: jax.Array) -> jax.Array:
  """``1 / (1 - beta**t)`` for the ``t = count + 1``-th step; 1 where ``beta == 0``.

  The moving average of ``t`` squared gradients, started at zero, carries
  the weight ``1 - beta**t`` (Adam's bias correction of its second moment).
  """
  t = count.astype(beta.dtype) + 1
  weight = jnp.where(beta == 0, jnp.ones([], beta.dtype), 1 - beta**t)
  return 1 / weight


def _keyword_only(factory: Callable[..., Any]) -> Callable[..., Any]:
  """Refuses calls written for ``optax.scale_by_sm3``, with the translation.

  ``functools.wraps`` keeps ``factory``'s signature visible to ``inspect``,
  which ``optax.inject_hyperparams`` reads.
  """

  @functools.wraps(factory)
  def wrapper(*args: Any, **kwargs: Any) -> Any:
    unknown = {k: v for k, v in kwargs.items() if k not in PARAMETERS}
    if args or unknown:
      _reject_optax_style(args, unknown)
    return factory(**kwargs)

  return wrapper


@_keyword_only
def scale_by_sm3(
  *,
  beta: jax.typing.ArrayLike | optax.Schedule = 0.0,
  bias_correction: bool = False,
  eps: jax.typing.ArrayLike = 1e-8,
  variant: str = "II",
  accumulator_dtype: jax.typing.DTypeLike | None = None,
  stacked_axes: PerParam | None = None,
  merge_axes_up_to: int | None = None,
  skip_unit_axes: bool = False,
  block_size: int | None = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by SM3's cover-based second-moment estimate.

  Preconditioning only: no learning rate, no momentum, no sign flip (see
  :func:`optax_sm3.sm3` for the full optimizer). For a gradient :math:`g` of
  a parameter whose cover has groups :math:`S_1, \dots, S_n` (by default one
  per axis) with accumulators :math:`a_1, \dots, a_n`, SM3-II computes

  .. math::

    m &= \min_r a_r \quad\text{(broadcast to } g\text{'s shape)} \\
    \nu &= \begin{cases} m + g^2 & \beta = 0 \\
                         \beta m + (1 - \beta) g^2 & 0 < \beta < 1
           \end{cases} \\
    u &= g \cdot \frac{1}{\sqrt{\nu + \epsilon}}
         \quad (u = 0 \text{ where } \nu = 0) \\
    a_r &\leftarrow \max_{\text{axes} \notin S_r} \nu

  and returns :math:`u`. SM3-I (``variant="I"``) instead updates the
  accumulators first, :math:`a_r \leftarrow c_{old} a_r + c_{new}
  \max_{\text{axes} \notin S_r} g^2`, then uses :math:`\nu = \min_r a_r`
  (same :math:`c_{old}, c_{new}` as above: 1, 1 for ``beta=0``).

  A parameter of rank 0 or 1 gets one accumulator of its own shape (diagonal
  AdaGrad, as the TensorFlow original); scalars are supported. Accumulators
  are float32 whatever the parameters' dtype; the update has the gradient's
  dtype. Memory: :math:`\sum_r d_r` numbers per parameter of shape
  :math:`(d_1, \dots, d_k)`, instead of :math:`\prod_r d_r`.

  Every argument is keyword-only. ``optax.scale_by_sm3(b1, b2, eps)`` takes
  momentum ``b1`` first and its second-moment decay ``b2`` (``1.0`` meaning
  sums) second, so a positional call written for it, e.g.
  ``scale_by_sm3(0.9, 1.0)``, would mean something else here: positional
  arguments and ``b1``/``b2`` raise a ``TypeError`` that gives the
  translation (``optax.scale_by_sm3(b1, b2, eps)`` is
  ``optax_sm3.sm3``'s ``scale_by_sm3(beta=0 if b2 == 1 else b2, eps=eps)``
  followed by ``scale_by_momentum(b1)``).

  Args:
    beta: second-moment decay in ``[0, 1)``; ``0`` sums squared gradients
      (AdaGrad-like, the paper's default), ``beta > 0`` keeps an exponential
      moving average. May be a traced value, or a schedule: a function of
      the step count (0 at the first update) to the decay of that step, e.g.
      Adafactor's rising ``lambda count: 1 - (count + 1.0) ** -0.8``, whose
      0 at the first step sums into empty accumulators, the same as an
      average. A schedule's values are not range-checked.
    bias_correction: divide the estimate the update is scaled by (never the
      accumulators kept) by ``1 - beta**t`` at the ``t``-th step, as Adam
      corrects its second moment for starting at zero; no effect where
      ``beta == 0``. Needs a constant ``beta`` (a ``ValueError`` for a
      schedule: a rising ``beta`` that starts at 0 has no bias to correct).
    eps: added to :math:`\nu` under the square root, ``>= 0``. May be traced.
    variant: ``"II"`` (the paper's SM3-II, default) or ``"I"``.
    accumulator_dtype: dtype of the accumulators. ``None`` means float32, or
      the parameter's dtype where that is wider (float64).
    stacked_axes: number of leading axes to treat as batch axes (``None``:
      none), each slice keeping a cover of its own (Flax ``nn.scan`` parameters shaped
      ``(L, d_in, d_out)`` with ``1`` keep ``L * (d_in + d_out)`` numbers
      instead of ``L + d_in + d_out``). An int for every parameter, a tree of
      ints matching the parameters, or a callable from parameters to such a
      tree (told apart as ``optax.masked`` does: a tree whose leaves are not
      all callable, an Equinox module of ints say, is a tree). Structural:
      never traced.
    merge_axes_up_to: merge runs of adjacent axes into one accumulator while
      the product of their sizes stays at or below this bound: a finer cover
      for a few more numbers (``9`` stores a ``(3, 3)`` block plus two
      vectors for a ``(3, 3, C_in, C_out)`` conv kernel: 9 instead of 6
      numbers for the spatial axes). ``None`` (default) merges nothing.
    skip_unit_axes: store no accumulator for size-1 axes (one number saved
      each). Exact: such an accumulator holds the global maximum, which never
      wins the minimum.
    block_size: on the CPU, parameters with more than 2**16 entries have
      their accumulators computed in a loop over blocks of at most this many
      entries (and at least two blocks; per shard with several devices, each
      device of a host taking ``block_size // devices``), so the step's
      temporary is one float32 block instead of one per parameter (results
      are bit-identical). ``None`` picks 2**20 (a 4 MiB block), or 2**18 for
      16-bit gradients; ``0`` turns the loop off.

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`ScaleBySM3State`.

  Raises:
    TypeError: for positional arguments or unknown keywords (``b1``/``b2``
      with the translation from ``optax.scale_by_sm3``), a non-floating
      ``accumulator_dtype``, or (at ``init``) parameters that are not real
      floating point; at ``update``, boolean gradients.
    ValueError: for ``beta`` outside ``[0, 1)``, ``eps`` negative or
      infinite, an unknown ``variant``, or (at ``init``) complex
      parameters; at ``update``, a gradient whose shape does not match the
      state (the message names its tree path and both shapes).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_sm3
    >>> tx = optax.chain(optax_sm3.scale_by_sm3(), optax.scale(-0.5))
    >>> params = {"w": jnp.ones((2, 3))}
    >>> state = tx.init(params)
    >>> [a.shape for a in state[0].accumulators["w"]]
    [(2,), (3,)]
    >>> target = jnp.tile(jnp.arange(3.0), (2, 1))
    >>> loss = lambda p: jnp.sum((p["w"] - target) ** 2)
    >>> for step in range(4):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(f"{loss(params):.3f}")
    1.000
    0.306
    0.098
    0.032

  References:
    Anil et al., `Memory-Efficient Adaptive Optimization
    <https://arxiv.org/abs/1901.11150>`_, 2019
  """
  if not isinstance(bias_correction, bool):
    raise TypeError(f"`bias_correction` must be a bool, got {bias_correction!r}")
  beta_schedule = beta if callable(beta) else None
  if not callable(beta):
    _validation.check_range("beta", beta, low=0.0, high=1.0, high_open=True)
  elif bias_correction:
    raise ValueError(
      "`bias_correction` needs a constant `beta`, got a schedule (a rising "
      "beta that starts at 0 has no bias to correct)"
    )
  _validation.check_range("eps", eps, low=0.0)
  accumulator_dtype = _validation.float_dtype("accumulator_dtype", accumulator_dtype)
  if variant not in _VARIANTS:
    raise ValueError(f"`variant` must be one of {_VARIANTS}, got {variant!r}")
  if merge_axes_up_to is not None:
    merge_axes_up_to = _static_int(merge_axes_up_to, "merge_axes_up_to")
  if merge_axes_up_to is not None and merge_axes_up_to < 1:
    raise ValueError(f"`merge_axes_up_to` must be >= 1, got {merge_axes_up_to}")
  if block_size is not None:
    block_size = _static_int(block_size, "block_size")
    if block_size < 0:
      raise ValueError(f"`block_size` must be >= 0, got {block_size}")

  def covers(tree):
    stacked = per_param(stacked_axes, tree, "stacked_axes")
    return jax.tree.map(
      lambda leaf, s: _cover.make_cover(
        np.shape(leaf),
        stacked_axes=s,
        merge_axes_up_to=merge_axes_up_to,
        skip_unit_axes=skip_unit_axes,
      ),
      tree,
      stacked,
    )

  def init_fn(params):
    # Shapes and dtypes only: `params` may be `jax.ShapeDtypeStruct`s
    # (`jax.eval_shape`, orbax restore targets) or Python numbers.
    _reject_complex(params)

    def zeros(param, cover):
      dtype = _accumulator_dtype(jnp.result_type(param), accumulator_dtype)
      return tuple(jnp.zeros(cover.accumulator_shape(g), dtype) for g in cover.groups)

    leaf_covers = covers(params)
    accumulators = jax.tree.map(zeros, params, leaf_covers)
    # Flax-boxed parameters: one box per accumulator, with its axes' sharding.
    accumulators = _boxes.box_accumulators(params, accumulators, leaf_covers)
    return ScaleBySM3State(jnp.zeros([], jnp.int32), accumulators)

  def update_fn(updates, state, params=None):
    del params
    boxed_updates = updates
    updates = jax.tree.map(jnp.asarray, _boxes.unboxed(updates))
    leaf_covers = covers(updates)

    def step(path, g, accumulators, cover, *, step_beta, count):
      if isinstance(accumulators, Mapping):
        # flax.nnx.Optimizer hands tuples back as mappings {0: a, 1: b}.
        accumulators = tuple(accumulators[i] for i in range(len(accumulators)))
      _check_shapes(path, g, accumulators, cover)
      dtype = accumulators[0].dtype
      if g.dtype == jnp.bool_:
        raise TypeError(
          f"gradient at {jax.tree_util.keystr(path)} is boolean; SM3 needs "
          "numeric gradients"
        )
      if not jnp.issubdtype(g.dtype, jnp.inexact):
        # Integer gradients would truncate the update: scale them as floats.
        g = g.astype(dtype)
      if g.size == 0:
        return g, tuple(accumulators)
      c_old, c_new = coefficients(step_beta, dtype)
      correction = None
      if bias_correction:
        correction = bias_correction_factor(jnp.asarray(step_beta, dtype), count)
      return precondition(
        g,
        accumulators,
        cover,
        c_old,
        c_new,
        jnp.asarray(eps, dtype),
        variant,
        _accumulate.default_block_size(g.dtype) if block_size is None else block_size,
        correction,
      )

    step_beta = beta if beta_schedule is None else beta_schedule(state.count)

    results = jax.tree_util.tree_map_with_path(
      functools.partial(step, step_beta=step_beta, count=state.count),
      updates,
      _boxes.unboxed(state.accumulators),
      leaf_covers,
    )
    new_updates, accumulators = _tree.unzip_pairs(updates, results)
    return _boxes.reboxed(boxed_updates, new_updates), ScaleBySM3State(
      _validation.safe_increment(state.count),
      _boxes.reboxed(state.accumulators, accumulators),
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _layout_specs(state: ScaleBySM3State, layout: _layout.ParamLayout) -> Any:
  """The counter replicated; each accumulator sharded like the parameter axes
  it indexes."""
  return state._replace(
    count=_layout.replicated(state.count),
    accumulators=layout.accumulators(state.accumulators),
  )


_layout.register(ScaleBySM3State, _layout_specs)
