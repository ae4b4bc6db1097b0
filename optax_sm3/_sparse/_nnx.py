"""Row-sparse embedding training in Flax NNX: SparseEmbed, the grad helper, the optimizer.

Where the table's optimizer state lives: in the :class:`SparseEmbed` module,
as ``sparse_state`` (:class:`SparseState` variables, not ``nnx.Param``), set
when a :class:`SparseOptimizer` is built for the model and written by its
``update``. The forward pass needs it: the sparse step may leave rows that
the batch did not touch *stale* in ``embedding`` (caught up when next
touched), so every read goes through ``optax_sm3.sparse_rows(...).lookup``
with that state. A module with no optimizer attached reads its table with a
plain gather, exactly as ``nnx.Embed``.

Consequences: ``nnx.state(model)`` holds the tables' SM3 state (``O(V + D)``
per table, plus a table-sized buffer with momentum), so a model checkpoint
restores into a model that has a :class:`SparseOptimizer` attached (build
both, then restore, the usual NNX order); ``optimizer.sync(model)`` makes
every ``embedding`` current (before reading it directly, checkpointing for
another consumer, or exporting); evaluation through the module is always
current.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.nnx.training.optimizer import OptState, to_opt_state

from optax_sm3._sparse import _capture, _grad, _nnx_state, _rows
from optax_sm3._sparse._types import SparseGrad, check_sparse_grad

_default_embed_init = initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


class SparseState(nnx.Variable):
  """The optimizer state of a :class:`SparseEmbed` table (not a parameter)."""


class SparseEmbed(nnx.Module):
  """``nnx.Embed`` whose table is trained one looked-up row at a time.

  A drop-in for :class:`flax.nnx.Embed`: the same arguments, the same table
  (``embedding``, an ``nnx.Param``, initialised from the same ``rngs``
  stream) and the same forward pass. Trained with
  :func:`value_and_grad` and :class:`SparseOptimizer`, its gradient is the
  looked-up ``(indices, row_grads)`` and its SM3 step costs ``O(k * D + V)``,
  not ``O(V * D)``; with ``nnx.grad`` and any optimizer it trains densely,
  like ``nnx.Embed``.

  Args:
    num_embeddings: rows of the table, ``>= 1``.
    features: entries per row, ``>= 1``.
    dtype: dtype of the returned rows (default: the table's).
    param_dtype: dtype of the table.
    embedding_init: initializer of the table.
    promote_dtype: as ``nnx.Embed``'s.
    padding_id: a row id that reads as zeros and is never trained (its row
      is zeroed at initialisation and its gradient is zero), like torch's
      ``padding_idx``; ``None`` (default) for none.
    rngs: the ``nnx.Rngs`` (its ``params`` stream initialises the table).
    embedding_metadata: metadata of the ``embedding`` parameter.

  Raises:
    ValueError: for sizes ``< 1`` or ``padding_id`` outside
      ``[0, num_embeddings)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax_sm3.nnx
    >>> embed = optax_sm3.nnx.SparseEmbed(10, 3, padding_id=0, rngs=nnx.Rngs(0))
    >>> embed(jnp.array([[0, 4]])).shape
    (1, 2, 3)
    >>> print(embed(jnp.array([0])))
    [[0. 0. 0.]]
  """

  def __init__(
    self,
    num_embeddings: int,
    features: int,
    *,
    dtype: jax.typing.DTypeLike | None = None,
    param_dtype: jax.typing.DTypeLike = jnp.float32,
    embedding_init: Callable[..., jax.Array] = _default_embed_init,
    promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
    padding_id: int | None = None,
    rngs: nnx.Rngs,
    embedding_metadata: Any = MappingProxyType({}),
  ):
    for name, value in (("num_embeddings", num_embeddings), ("features", features)):
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    if padding_id is not None and (
      not isinstance(padding_id, int) or not 0 <= padding_id < num_embeddings
    ):
      raise ValueError(
        f"`padding_id` must be None or an int in [0, {num_embeddings}), got {padding_id!r}"
      )
    table = embedding_init(rngs.params(), (num_embeddings, features), param_dtype)
    if padding_id is not None:
      table = table.at[padding_id].set(0)
    self.embedding = nnx.Param(table, **embedding_metadata)
    self.num_embeddings = num_embeddings
    self.features = features
    self.dtype = dtype or self.embedding.dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype
    self.padding_id = padding_id
    # Set by SparseOptimizer: the sparse_rows functions and their state.
    self.sparse_rows: _rows.SparseRows | None = None
    self.sparse_state = nnx.data(None)

  def _current(self, table: jax.Array) -> jax.Array:
    """The whole table as the optimizer holds it now; gradients pass to ``table``."""
    if self.sparse_rows is None:
      return table
    state = nnx.as_pure(self.sparse_state)
    synced, _ = self.sparse_rows.sync(
      jax.lax.stop_gradient(state), jax.lax.stop_gradient(table)
    )
    return _grad.value_of_first(synced, table)

  def _read(self, table: jax.Array, ids: jax.Array) -> jax.Array:
    if self.sparse_rows is None:
      return _grad.take_rows(table, ids)
    return _grad.current_rows(
      self.sparse_rows.lookup, nnx.as_pure(self.sparse_state), table, ids
    )

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Embeds ``inputs`` (integer ids of any shape) along a new last axis.

    Raises:
      TypeError: for non-integer ``inputs``.
      ValueError: for concrete ids outside ``[0, num_embeddings)``.
    """
    ids = _grad.check_ids(inputs, self.num_embeddings, "inputs")
    rows = _capture.read_rows(self.embedding[...], ids, self._read)
    if self.padding_id is not None:
      rows = jnp.where(
        (ids == self.padding_id)[..., None], jnp.zeros((), rows.dtype), rows
      )
    (rows,) = self.promote_dtype((rows,), dtype=self.dtype, inexact=False)
    return rows

  def attend(self, query: jax.Array) -> jax.Array:
    """``query @ embedding.T`` (tied output embeddings), as ``nnx.Embed.attend``.

    This reads the whole table, so under :func:`value_and_grad` the table's
    gradient is dense (its lookups included), and :class:`SparseOptimizer`
    steps every row of it in that step (``sparse_rows`` with all ids, which
    is the dense SM3 step): exact, at ``O(V * D)`` plus a sort of ``V`` ids.
    With an optimizer attached it reads the synced table (``sparse_rows``'s
    ``sync``), so it is current even where stored rows are stale.
    """
    query, embedding = self.promote_dtype(
      (query, self._current(self.embedding[...])), dtype=self.dtype
    )
    return jnp.dot(query, embedding.T)


def _tables_of(node: Any) -> dict[tuple, list[SparseEmbed]]:
  """Each SparseEmbed table's state path, with every module that uses it.

  A table Variable shared by several SparseEmbeds (tied embeddings) is one
  entry, at the path ``nnx.state`` gives it (its first path in the graph).
  """
  paths, tables = {}, {}
  for path, value in nnx.iter_graph(node):
    if isinstance(value, nnx.Variable):
      paths.setdefault(id(value), tuple(path))
  for _, value in nnx.iter_graph(node):
    if isinstance(value, SparseEmbed):
      tables.setdefault(paths[id(value.embedding)], []).append(value)
  return tables


def value_and_grad(
  f: Callable[..., Any], argnums: int | Sequence[int] = 0, *, has_aux: bool = False
) -> Callable[..., Any]:
  """``nnx.value_and_grad`` with row-sparse gradients for SparseEmbed tables.

  The gradient of every ``nnx.Param`` is what ``nnx.value_and_grad`` gives,
  except the ``embedding`` of a :class:`SparseEmbed` that ``f`` reads only
  by calling the module: its entry holds a :class:`SparseGrad`
  ``(indices, row_grads)`` of every lookup in ``f`` (any number of calls,
  through any SparseEmbed that shares the table; repeats kept, an optimizer
  sums them), and no table-sized array is formed. Calls may sit under
  ``jax.jit`` / ``nnx.jit``, ``jax.checkpoint`` / ``nnx.remat`` and
  ``jax.vmap`` / ``nnx.vmap`` (any nesting) inside ``f``. A table that ``f``
  also reads another way (``attend``, a penalty on ``embedding``, a vmap
  over stacked tables) gets its dense gradient instead, as ``nnx.grad``
  would give it; :class:`SparseOptimizer` handles both. A table not looked
  up at all gets an empty :class:`SparseGrad` (``k = 0``).

  ``f`` is traced twice (once abstractly, to find the lookups' shapes), so it
  must be a deterministic function of its arguments' shapes; it runs once.

  Args:
    f: the loss; its differentiated arguments are NNX modules (or arrays).
    argnums: which positional arguments to differentiate (an int or a tuple
      of ints), as ``nnx.value_and_grad``.
    has_aux: whether ``f`` returns ``(value, aux)``.

  Returns:
    A function of ``f``'s arguments returning ``(value, grads)`` (or
    ``((value, aux), grads)``); ``grads`` is an ``nnx.State`` per
    differentiated module (a tuple for a tuple ``argnums``).

  Raises:
    ValueError: at trace time, for a lookup inside ``nnx.scan`` /
      ``lax.scan``, ``fori_loop`` / ``while_loop`` or ``shard_map``: embed
      the ids of every step before the loop instead.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax_sm3.nnx
    >>> embed = optax_sm3.nnx.SparseEmbed(1000, 2, rngs=nnx.Rngs(0))
    >>> loss = lambda m: jnp.sum(m(jnp.array([[3, 5], [3, 9]])) ** 2)
    >>> _, grads = optax_sm3.nnx.value_and_grad(loss)(embed)
    >>> print(grads["embedding"].get_value().indices)
    [3 5 3 9]
  """

  @functools.wraps(f)
  def wrapper(*args):
    nums = _grad.normalize_argnums(argnums, len(args))
    graph_nums = [i for i in nums if nnx.graph.is_graph_node(args[i])]
    tables_of = {i: _tables_of(args[i]) for i in graph_nums}
    paths = {i: frozenset(tables_of[i]) for i in graph_nums}

    # 1. Abstract pass: the lookups, and which tables are also read densely.
    splits = {}
    for i in graph_nums:
      table_filter = functools.partial(lambda p, path, _: tuple(path) in p, paths[i])
      splits[i] = nnx.split(args[i], table_filter, ...)
    keys, primals, layouts = [], [], {}
    for i in graph_nums:
      leaves, treedef = jax.tree.flatten(splits[i][1])
      layouts[i] = (treedef, len(leaves))
      keys.extend((i, tuple(path)) for path, _ in nnx.to_flat_state(splits[i][1]))
      primals.extend(leaves)

    def traced(values):
      new, start = list(args), 0
      for i in graph_nums:
        graphdef, _, rest = splits[i]
        treedef, n = layouts[i]
        tables = jax.tree.unflatten(treedef, values[start : start + n])
        start += n
        # Fresh variables: the loss may mutate state (lifted transforms do).
        new[i] = nnx.merge(graphdef, tables, rest, copy=True)
      out = f(*new)
      return out[0] if has_aux else out

    plan = _capture.plan(traced, primals)
    dense = {keys[j] for j in plan.dense}
    sparse_keys = {key for i in graph_nums for key in ((i, p) for p in paths[i])}
    sparse_keys -= dense
    slots = _capture.slots(plan)

    # 2. Differentiated pass, through nnx.value_and_grad.
    def inner(*inner_args):
      *model_args, slots = inner_args
      with _capture.differentiating(plan, slots):
        out = f(*model_args)
      return out if has_aux else (out, None)

    diff_nums = []
    for i in nums:
      if i in paths:
        skip = frozenset(path for (j, path) in sparse_keys if j == i)
        wrt = nnx.All(
          nnx.Param, functools.partial(lambda s, path, _: tuple(path) not in s, skip)
        )
        diff_nums.append(nnx.DiffState(i, wrt))
      else:
        diff_nums.append(i)
    (value, aux), grads = nnx.value_and_grad(
      inner, argnums=(*diff_nums, len(args)), has_aux=True
    )(*args, slots)
    *grads, slot_grads = grads
    by_leaf = _capture.assemble(plan, slot_grads, lambda j: primals[j].shape[0])
    by_key = {keys[j]: g for j, g in by_leaf.items()}
    out = []
    for i, g in zip(nums, grads, strict=True):
      if i in paths:
        flat = list(nnx.to_flat_state(g))
        for j, path in sorted(sparse_keys):
          if j != i:
            continue
          grad = by_key.get((i, path))
          if grad is None:
            table = tables_of[i][path][0].embedding
            grad = _capture.empty_grad(table.shape, table.dtype)
          flat.append((path, nnx.Param(grad)))
        g = nnx.from_flat_state(flat)
      out.append(g)
    grads = out[0] if isinstance(argnums, int) else tuple(out)
    return ((value, aux) if has_aux else value), grads

  return wrapper


def grad(
  f: Callable[..., Any], argnums: int | Sequence[int] = 0, *, has_aux: bool = False
) -> Callable[..., Any]:
  """:func:`value_and_grad` without the value: ``grads`` (or ``(grads, aux)``).

  Args:
    f: the loss.
    argnums: as :func:`value_and_grad`.
    has_aux: as :func:`value_and_grad`.

  Returns:
    A function returning ``grads`` (or ``(grads, aux)`` with ``has_aux``).
  """
  fn = value_and_grad(f, argnums, has_aux=has_aux)

  @functools.wraps(f)
  def wrapper(*args):
    value, grads = fn(*args)
    return (grads, value[1]) if has_aux else grads

  return wrapper


def _path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


class SparseOptimizer(nnx.Pytree):
  """``nnx.Optimizer`` that takes exact row-sparse SM3 steps on SparseEmbed tables.

  The ``embedding`` of every :class:`SparseEmbed` in the model is trained by
  :func:`optax_sm3.sparse_rows` (exact SM3 with ``learning_rate``,
  ``momentum``, ``beta``, ``eps``, ``weight_decay``) from the
  :class:`SparseGrad` that :func:`value_and_grad` gives it; every other
  parameter selected by ``wrt`` by ``tx``. The result equals, to float
  rounding, training the same model with dense gradients,
  ``optax_sm3.sm3(learning_rate, momentum, beta, eps,
  weight_decay=weight_decay)`` on the tables and ``tx`` on the rest. A table
  whose gradient came out dense (``attend``) takes the dense SM3 step.

  Building it attaches the tables' state to their modules (``sparse_state``,
  see the module docs): the module reads its rows through it, so build the
  optimizer before restoring a checkpoint into the model.

  Args:
    model: the NNX module to train.
    tx: optax transformation of the other parameters.
    learning_rate: the tables' learning rate (float or schedule of the step).
    momentum: as :func:`optax_sm3.sm3`.
    beta: as :func:`optax_sm3.sm3`.
    eps: as :func:`optax_sm3.sm3`.
    weight_decay: decoupled weight decay of the tables.
    wrt: filter of the variables to train (``nnx.Param``); SparseEmbed tables
      are always trained.

  Attributes:
    step: ``OptState`` uint32 step count.
    tx: the transformation of the other parameters.
    opt_state: its state.
    wrt: the filter.
    sparse_rows: the tables' :class:`optax_sm3.SparseRows`.

  Raises:
    ValueError: at ``update``, for grads that do not match the model or a
      table whose shape changed since the optimizer was built.
  """

  def __init__(
    self,
    model: nnx.Module,
    tx: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    momentum: jax.typing.ArrayLike = 0.0,
    beta: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    wrt: Any = nnx.Param,
  ):
    self.sparse_rows = _rows.sparse_rows(
      learning_rate, momentum, beta, eps, weight_decay
    )
    tables = _tables_of(model)
    self.table_shapes = tuple(
      (path, tuple(modules[0].embedding.shape))
      for path, modules in sorted(tables.items())
    )
    for modules in tables.values():
      # One state per table, shared by every module that uses the table.
      state = _nnx_state.sparse_state_variables(
        self.sparse_rows, modules[0].embedding, SparseState
      )
      for module in modules:
        module.sparse_rows = self.sparse_rows
        module.sparse_state = nnx.data(state)
    self.step = OptState(jnp.array(0, dtype=jnp.uint32))
    self.tx = tx
    self.wrt = wrt
    self.opt_state = nnx.data(
      to_opt_state(tx.init(nnx.state(model, self._dense_filter)))
    )

  def _dense_filter(self, path, value) -> bool:
    tables = {p for p, _ in self.table_shapes}
    return tuple(path) not in tables and nnx.filterlib.to_predicate(self.wrt)(
      path, value
    )

  def _tables(self, model) -> dict[tuple, SparseEmbed]:
    """Each table's path and the module that holds it (and its shared state)."""
    tables = _tables_of(model)
    expected = dict(self.table_shapes)
    if set(tables) != set(expected):
      raise ValueError(
        "`model` does not have the SparseEmbed tables this optimizer was built "
        f"for: expected {sorted(map(_path_str, expected))}, got "
        f"{sorted(map(_path_str, tables))}"
      )
    for path, modules in tables.items():
      module = modules[0]
      if tuple(module.embedding.shape) != expected[path]:
        raise ValueError(
          f"the table at {_path_str(path)} has shape {tuple(module.embedding.shape)}, "
          f"but this optimizer was built for shape {expected[path]}"
        )
      for other in modules:
        if other.sparse_rows is not self.sparse_rows:
          raise ValueError(
            f"a SparseEmbed using the table at {_path_str(path)} belongs to "
            "another SparseOptimizer (the latest one built for it owns it)"
          )
    # The first module of each table holds the (shared) table and state.
    tables = {path: modules[0] for path, modules in tables.items()}
    return tables

  def update(self, model: nnx.Module, grads: nnx.State, /, **kwargs) -> None:
    """Takes one step: ``tx`` on the dense parameters, SM3 rows on the tables.

    Args:
      model: the module the optimizer was built for.
      grads: from :func:`value_and_grad` (or :func:`grad`) on ``model``.
      **kwargs: passed to ``tx.update``.

    Raises:
      ValueError: if ``grads`` does not match ``model`` (another model's
        grads, a missing table) or a table's shape changed.
      TypeError: if a table's gradient is neither a :class:`SparseGrad` nor an
        array of the table's shape.
    """
    tables = self._tables(model)
    flat_grads = dict(nnx.to_flat_state(grads))
    # Dense parameters, as nnx.Optimizer.update.
    params = nnx.as_pure(nnx.state(model, self._dense_filter))
    dense_grads = nnx.as_pure(nnx.state(grads, self._dense_filter))
    param_paths = [
      tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, self._dense_filter))
    ]
    grad_paths = [
      tuple(p) for p, _ in nnx.to_flat_state(nnx.state(grads, self._dense_filter))
    ]
    if param_paths != grad_paths:
      missing = sorted(map(_path_str, set(param_paths) - set(grad_paths)))
      extra = sorted(map(_path_str, set(grad_paths) - set(param_paths)))
      raise ValueError(
        "`grads` does not match the model's parameters: missing "
        f"{missing[:5]}, unexpected {extra[:5]}; compute them with "
        "optax_sm3.nnx.value_and_grad on this model"
      )
    updates, new_opt_state = self.tx.update(
      dense_grads, nnx.as_pure(self.opt_state), params, **nnx.as_pure(kwargs)
    )
    nnx.update(model, optax.apply_updates(params, updates))
    nnx.update(self.opt_state, nnx.state(new_opt_state))

    for path, module in tables.items():
      if path not in flat_grads:
        raise ValueError(
          f"`grads` has no entry for the table at {_path_str(path)}; compute "
          "them with optax_sm3.nnx.value_and_grad on this model"
        )
      grad = nnx.as_pure(flat_grads[path])
      table = module.embedding[...]
      state = nnx.as_pure(module.sparse_state)
      if isinstance(grad, SparseGrad):
        # k = 0 (no lookup this step) is sparse_rows' zero-gradient step.
        check_sparse_grad(
          grad, tuple(table.shape[1:]), name=f"the gradient of {_path_str(path)}"
        )
        indices, row_grads = grad
        table, state = self.sparse_rows.update(indices, row_grads, state, table)
      elif hasattr(grad, "shape") and tuple(grad.shape) == tuple(table.shape):
        # The table was read densely (attend): every row is in the batch, so
        # the sparse step is the dense SM3 step (sparse_rows is exact for
        # any indices), whatever the state keeps.
        rows = jnp.arange(table.shape[0], dtype=jnp.int32)
        table, state = self.sparse_rows.update(rows, grad, state, table)
      else:
        raise TypeError(
          f"the gradient for the table at {_path_str(path)} must be a SparseGrad "
          f"or an array of shape {tuple(table.shape)}, got {type(grad).__name__}"
          f" {getattr(grad, 'shape', '')}"
        )
      module.embedding[...] = table
      nnx.update(module.sparse_state, nnx.state(state))
    self.step[...] += 1

  def sync(self, model: nnx.Module) -> None:
    """Makes every table's ``embedding`` current (as the dense optimizer's).

    Call it before reading ``embedding`` directly, exporting or handing a
    checkpoint to code without this optimizer; the module's own forward pass
    is always current.

    Args:
      model: the module the optimizer was built for.
    """
    for module in self._tables(model).values():
      table, state = self.sparse_rows.sync(
        nnx.as_pure(module.sparse_state), module.embedding[...]
      )
      module.embedding[...] = table
      nnx.update(module.sparse_state, nnx.state(state))
