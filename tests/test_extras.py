"""The optional integrations' import contract, one battery for every namespace.

``import optax_sm3`` loads no framework; each framework namespace, imported
or reached as an attribute without its framework, raises an ``ImportError``
that names the extra to install; other import errors pass through.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from optax_sm3 import _extras

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)
FRAMEWORKS = ("flax", "orbax", "equinox", "brainstate", "braintools")
# namespace, the module it needs, the extra that installs it
NAMESPACES = [
  ("nnx", "flax", "flax"),
  ("linen", "flax", "flax"),
  ("equinox", "equinox", "equinox"),
]


def _run(code: str) -> str:
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    capture_output=True,
    text=True,
    env=env,
    check=False,
  )
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_importing_optax_sm3_imports_no_framework():
  out = _run(
    f"""
    import sys
    import optax_sm3
    print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))
    """
  )
  assert out.strip() == "[]"


@pytest.mark.parametrize(("namespace", "module", "extra"), NAMESPACES)
def test_a_namespace_without_its_framework_names_the_extra(namespace, module, extra):
  out = _run(
    f"""
    import sys
    sys.modules[{module!r}] = None  # `import {module}` now fails
    import optax_sm3
    for how in ("import", "attribute"):
      try:
        if how == "import":
          import optax_sm3.{namespace}
        else:
          optax_sm3.{namespace}
      except ImportError as error:
        print(how, "|", error)
      else:
        print(how, "| no error")
    """
  )
  lines = out.strip().splitlines()
  assert [line.split(" | ")[0] for line in lines] == ["import", "attribute"]
  for line in lines:
    message = line.split(" | ", 1)[1]
    assert f"optax_sm3.{namespace}" in message, line
    assert f"pip install 'optax-sm3[{extra}]'" in message, line


def test_other_import_errors_pass_through():
  with pytest.raises(ModuleNotFoundError, match="not_flax") as info:
    with _extras.requiring("optax_sm3.nnx", "flax", "Flax", "flax"):
      raise ModuleNotFoundError("No module named 'not_flax'", name="not_flax")
  assert info.value.__cause__ is None
  with pytest.raises(ImportError, match=r"pip install 'optax-sm3\[flax\]'"):
    with _extras.requiring("optax_sm3.nnx", "flax", "Flax", "flax"):
      raise ModuleNotFoundError("No module named 'flax.nnx'", name="flax.nnx")
