"""The public API is annotated with named types: ``Any`` only where anything goes.

Walks every name of the public facades (``optax_sm3`` and the framework
namespaces whose extras are installed): functions, classes (their public
methods and properties, NamedTuple and dataclass fields, in the package's own
classes of the MRO), resolves each annotation (``typing.get_type_hints`` where
it can, else each annotation on its own, else its text) and fails on a bare
``typing.Any`` anywhere in it, unless ``(name, parameter)`` is in
``ALLOWED`` below with the reason anything goes there.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import re
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any

import jax
import pytest

# Facade, and the extra whose module it needs (None: the core).
FACADES = (
  ("optax_sm3", None),
  ("optax_sm3.brainstate", None),
  ("optax_sm3.nnx", "flax"),
  ("optax_sm3.linen", "flax"),
  ("optax_sm3.equinox", "equinox"),
)

# (the object's first public name, parameter or field or "return"): why
# anything goes there. Each name is the first under which the walk meets the
# object (optax_sm3 first), so `optax_sm3.linen.value_and_grad`, the same
# function as `optax_sm3.sparse_value_and_grad`, is listed under the latter.
_LOSS = "the caller's loss: any arguments, any value (or (value, aux))"
_LOSS_BACK = "gives back the caller's loss value (or (value, aux)) as it is"
ALLOWED = {
  ("optax_sm3.sparse_value_and_grad", "fun"): _LOSS,
  ("optax_sm3.sparse_value_and_grad", "return"): _LOSS_BACK,
  ("optax_sm3.SparseTables.value_and_grad", "value_and_grad"): _LOSS_BACK,
  ("optax_sm3.SparseMultiSteps.value_and_grad", "value_and_grad"): _LOSS_BACK,
  ("optax_sm3.nnx.value_and_grad", "f"): _LOSS,
  ("optax_sm3.nnx.value_and_grad", "return"): _LOSS_BACK,
  ("optax_sm3.nnx.grad", "f"): _LOSS,
  (
    "optax_sm3.nnx.grad",
    "return",
  ): "gives grads, or (grads, aux) with the caller's aux",
  ("optax_sm3.linen.SparseTrainState.value_and_grad", "fun"): _LOSS,
  ("optax_sm3.linen.SparseTrainState.value_and_grad", "return"): _LOSS_BACK,
  ("optax_sm3.linen.SparseTrainState.apply_fn", "apply_fn"): (
    "the model's apply: its outputs are the model's (as Flax's TrainState)"
  ),
  ("optax_sm3.linen.SparseTrainState.create", "apply_fn"): "as the apply_fn field",
  ("optax_sm3.equinox.filter_value_and_grad", "fun"): _LOSS,
  ("optax_sm3.equinox.filter_value_and_grad", "return"): (
    "the loss's value and grads shaped as its first argument (any pytree)"
  ),
  ("optax_sm3.equinox.SparseOptimizer.filter_value_and_grad", "fun"): _LOSS,
  ("optax_sm3.equinox.SparseOptimizer.filter_value_and_grad", "return"): (
    "as optax_sm3.equinox.filter_value_and_grad's"
  ),
  ("optax_sm3.SM3.step", "extra_args"): (
    "passed to the optax update as they are (optax types them Any)"
  ),
  ("optax_sm3.SM3.update", "extra_args"): "as SM3.step's",
  ("optax_sm3.SM3.param_groups", "param_groups"): (
    "a group's entries are of different kinds (as braintools types them)"
  ),
  ("optax_sm3.SM3.load_state_dict", "state_dict"): (
    "a restored checkpoint, as braintools types it; every entry is checked"
  ),
  ("optax_sm3.brainstate.ConstantLR.load_state_dict", "state_dict"): (
    "a checkpoint, as braintools types it"
  ),
  ("optax_sm3.nnx.SparseEmbed.__init__", "embedding_metadata"): (
    "Variable metadata: any values (as nnx.Embed's)"
  ),
}


def _aliases() -> list[tuple[str, Any]]:
  """Other libraries' named aliases that hold ``Any`` themselves."""
  found = [("jax.typing.DTypeLike", jax.typing.DTypeLike)]  # type[Any]: a class
  if "flax" in sys.modules:
    from flax import nnx

    found.append(("flax.nnx.filterlib.Filter", nnx.filterlib.Filter))
  return found


def _key(member: Any) -> Any:
  return typing.get_origin(member) or member


def _walk(hint: Any, where: str, aliases: list[tuple[str, Any]]) -> list[str]:
  """Where bare ``Any`` appears in ``hint``."""
  if hint is Any:
    return [where]
  if isinstance(hint, typing.ForwardRef):
    hint = hint.__forward_arg__
  if isinstance(hint, str):  # names imported for type checkers only
    return [where] if re.search(r"\bAny\b", hint) else []
  args = list(typing.get_args(hint))
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    keys = {_key(a) for a in args}
    for _, alias in aliases:
      alias_keys = {_key(a) for a in typing.get_args(alias)}
      if alias_keys <= keys:
        args = [a for a in args if _key(a) not in alias_keys]
        keys -= alias_keys
  elif typing.get_origin(hint) in (Mapping, dict) and args and args[0] is Any:
    # A pytree's dict keys are anything hashable, as chex.ArrayTree writes
    # them: Mapping is invariant in its key, so Hashable would refuse dict[str, X].
    args = args[1:]
  found = []
  for arg in args:
    if isinstance(arg, list):  # Callable's parameters
      for a in arg:
        found += _walk(a, where, aliases)
    elif arg is not Ellipsis:
      found += _walk(arg, where, aliases)
  return found


def _hints(
  annotations: dict[str, Any], globalns: dict, localns: dict | None = None
) -> dict[str, Any]:
  """``annotations`` resolved as far as they can be."""

  def holder():
    pass

  holder.__annotations__ = dict(annotations)
  try:
    return typing.get_type_hints(holder, globalns, localns)
  except Exception:  # a name for type checkers only: one by one
    pass
  out = {}
  for name, ann in annotations.items():
    text = ann.__forward_arg__ if isinstance(ann, typing.ForwardRef) else ann
    if isinstance(text, str):  # NamedTuple fields' are ForwardRefs
      try:
        ann = eval(text, globalns, localns)
      except Exception:
        pass  # its text is checked
    out[name] = ann
  return out


def _function_hints(fn: Any) -> dict[str, Any]:
  fn = inspect.unwrap(fn)
  return _hints(getattr(fn, "__annotations__", {}), fn.__globals__)


def _class_members(cls: type) -> list[tuple[str, str, Any]]:
  """``(member, parameter, annotation)`` of ``cls``'s public surface."""
  out = []
  fields: set[str] = set()
  for base in reversed(cls.__mro__):
    if not base.__module__.startswith("optax_sm3"):
      continue
    module = sys.modules[base.__module__].__dict__
    own = inspect.get_annotations(base)
    for name, ann in _hints(own, module, dict(vars(base))).items():
      fields.add(name)
      if not name.startswith("_"):
        out.append((name, name, ann))
  for base in reversed(cls.__mro__):
    if not base.__module__.startswith("optax_sm3"):
      continue
    for name, value in vars(base).items():
      if name in fields or name == "__new__":
        continue  # fields are checked as fields (a NamedTuple's __new__ too)
      if name.startswith("_") and name not in ("__init__", "__call__"):
        continue
      functions = []
      if isinstance(value, property):
        functions = [f for f in (value.fget, value.fset) if f is not None]
      elif isinstance(value, (staticmethod, classmethod)):
        functions = [value.__func__]
      elif inspect.isfunction(value):
        functions = [value]
      for fn in functions:
        for param, ann in _function_hints(fn).items():
          if name == "__init__" and dataclasses.is_dataclass(cls) and param in fields:
            continue  # a generated __init__: its fields are checked as fields
          out.append((name, param, ann))
  return out


def _public_annotations() -> list[tuple[str, str, Any]]:
  """``(first public name, parameter, annotation)`` over every facade."""
  seen: dict[int, str] = {}
  out = []
  for facade, extra in FACADES:
    if extra is not None and importlib.util.find_spec(extra) is None:
      continue
    module = importlib.import_module(facade)
    for name in module.__all__:
      obj = getattr(module, name)
      if id(obj) in seen:
        continue
      seen[id(obj)] = public = f"{facade}.{name}"
      if inspect.isclass(obj):
        for member, param, ann in _class_members(obj):
          out.append((f"{public}.{member}", param, ann))
      elif callable(obj):
        for param, ann in _function_hints(obj).items():
          out.append((public, param, ann))
  return out


def _bare_anys() -> dict[tuple[str, str], Any]:
  annotations = _public_annotations()
  aliases = _aliases()  # after the walk, which imports the frameworks
  return {
    (name, param): ann
    for name, param, ann in annotations
    if _walk(ann, f"{name}({param})", aliases)
  }


def test_no_bare_any_in_public_annotations():
  found = _bare_anys()
  unexpected = {k: v for k, v in found.items() if k not in ALLOWED}
  assert not unexpected, (
    "public annotations with a bare typing.Any (name the type: optax.Params, "
    "optax.Updates, jax.Array, ...; or add the (name, parameter) to ALLOWED "
    "with why anything goes there):\n"
    + "\n".join(f"  {n} {p}: {a}" for (n, p), a in sorted(unexpected.items()))
  )


def _facade_of(name: str) -> str:
  return max((f for f, _ in FACADES if name.startswith(f + ".")), key=len)


def test_allow_list_entries_are_still_needed():
  walked = {
    f for f, extra in FACADES if extra is None or importlib.util.find_spec(extra)
  }
  found = _bare_anys()
  stale = [k for k in ALLOWED if _facade_of(k[0]) in walked and k not in found]
  assert not stale, f"ALLOWED entries with no bare Any left (remove them): {stale}"


def test_the_walk_sees_the_api():
  # The walk reaches fields, methods, properties and facades' functions.
  names = {(n, p) for n, p, _ in _public_annotations()}
  assert ("optax_sm3.ScaleByMomentumState.momentum", "momentum") in names
  assert ("optax_sm3.polyak_params", "opt_state") in names
  assert ("optax_sm3.SM3.lr", "return") in names
  assert ("optax_sm3.SM3.__init__", "lr") in names
  assert ("optax_sm3.SparseGrad.__init__", "indices") in names
  assert ("optax_sm3.SparseTables.step", "step") in names


@pytest.mark.parametrize(
  ("hint", "bare"),
  [
    (Any, True),
    (int | None, False),
    (list[Any], True),
    (typing.Callable[..., Any], True),
    (typing.Callable[[Any], int], True),
    (Mapping[Any, int], False),  # a dict key
    (Mapping[str, Any], True),
    (jax.typing.DTypeLike, False),
    (jax.typing.DTypeLike | None, False),
    (jax.typing.ArrayLike, False),
    ("Any | None", True),
    ("brainstate.State", False),
  ],
)
def test_walk(hint, bare):
  assert bool(_walk(hint, "x", _aliases())) == bare
