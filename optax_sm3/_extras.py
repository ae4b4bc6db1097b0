"""Optional integrations: the import guard each framework namespace starts with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def requiring(
  namespace: str, module: str, framework: str, extra: str
) -> Iterator[None]:
  """A ``with`` block whose missing ``module`` raises an ``ImportError`` naming the extra.

  Other import errors pass through unchanged.

  Args:
    namespace: the namespace that needs it (``"optax_sm3.nnx"``).
    module: the top-level module the block imports (``"flax"``).
    framework: its name in the message (``"Flax"``).
    extra: the ``optax-sm3`` extra that installs it (``"flax"``).

  Raises:
    ImportError: when ``module`` cannot be imported, chained to the original.
  """
  try:
    yield
  except ModuleNotFoundError as error:
    if (error.name or "").split(".")[0] != module:
      raise
    raise ImportError(
      f"{namespace} needs {framework}; install it with: "
      f"pip install 'optax-sm3[{extra}]'"
    ) from error
