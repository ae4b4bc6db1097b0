"""What scripts/test_min_versions.sh installs and runs, read from the source tree.

  python scripts/_min_versions.py pins [EXTRA...]
    every requirement of `dependencies`, `[test]` and the named extras pinned at its
    `>=` bound, the highest where two name one package (`[flax]` raises jax's);
    jaxlib at jax's version, as jax pins it.
  python scripts/_min_versions.py core-ignores
    ``--ignore=`` for the test files the core set cannot collect (they import an
    extra's module at their top level).
  python scripts/_min_versions.py files EXTRA|all
    the test files and library modules that use the extra, so that a new test file
    or module joins its extra's run without editing a list.

A test file uses an extra when it imports one of the extra's modules (at any
level, `pytest.importorskip` included), names one of its namespaces
(`optax_sm3.nnx`), or names an example that imports one of its modules. A library
module uses it when it names one of the modules (its doctests then run there).
"""

import ast
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent

# extra: (the top-level modules it installs, optax_sm3's namespaces over them)
EXTRAS = {
  "flax": (("flax", "orbax"), ("nnx", "linen")),
  "equinox": (("equinox",), ("equinox",)),
  "brainstate": (("brainstate", "braintools"), ("brainstate",)),
}
# Files no min-versions run reads: they need the benchmarks' data packages or the
# built documentation site (scripts/test.sh runs them).
NEVER = {"test_docs.py", "test_benchmarks.py"}
NEVER_PREFIX = "test_benchmarks_"


def _version(text):
  return tuple(int(part) for part in re.findall(r"\d+", text))


def pins(extras):
  with open(ROOT / "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
  optional = project["optional-dependencies"]
  bounds = {}
  for req in (
    project["dependencies"]
    + optional["test"]
    + [r for extra in extras for r in optional[extra]]
  ):
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", req)
    if m is None:
      raise SystemExit(f"pyproject.toml: {req!r} has no plain '>=' lower bound to test")
    name, version = m[1].lower(), m[2]
    if name not in bounds or _version(version) > _version(bounds[name]):
      bounds[name] = version
  if "jax" in bounds:
    bounds["jaxlib"] = bounds["jax"]
  return [f"{name}=={version}" for name, version in bounds.items()]


def _mentions(modules, namespaces, stems):
  """A regex for text that uses the extra: a module, a namespace, an example."""
  names = "|".join(modules)
  return re.compile(
    "|".join(
      [
        rf"(?<![A-Za-z])({names})(?![A-Za-z])",
        rf"optax_sm3\.({'|'.join(namespaces)})\b",
      ]
      + [rf"\b{re.escape(stem)}\b" for stem in stems]
    )
  )


def _tests(path, uses):
  """The test ids in ``path`` that use the extra.

  The whole file when a statement outside its functions (docstrings aside) does
  (an import, a module-level importorskip), else each test function that does or
  that calls a helper function that does.
  """
  tree = ast.parse(path.read_text())
  source = path.read_text()
  functions = [
    node
    for node in tree.body
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
  ]
  rest = [
    node
    for node in tree.body
    if node not in functions
    and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
  ]
  if any(uses.search(ast.get_source_segment(source, node) or "") for node in rest):
    return [str(path.relative_to(ROOT))]
  text = {f.name: ast.get_source_segment(source, f) or "" for f in functions}
  helpers = [
    name for name in text if not name.startswith("test_") and uses.search(text[name])
  ]
  calls = re.compile(rf"\b({'|'.join(helpers)})\b") if helpers else None
  return [
    f"{path.relative_to(ROOT)}::{name}"
    for name, body in text.items()
    if name.startswith("test_")
    and (uses.search(body) or (calls is not None and calls.search(body)))
  ]


def files(extra):
  modules, namespaces = EXTRAS[extra]
  imports = re.compile(
    rf"^\s*(from|import)\s+({'|'.join(modules)})\b|importorskip\(\s*[\"']({'|'.join(modules)})\b",
    re.M,
  )
  stems = [
    p.stem for p in (ROOT / "examples").glob("*.py") if imports.search(p.read_text())
  ]
  uses = _mentions(modules, namespaces, stems)
  tests = [
    test_id
    for p in _test_files()
    if _top_level_extras(p) <= {extra}  # else it cannot be collected here
    for test_id in _tests(p, uses)
  ]
  word = re.compile(rf"(?<![A-Za-z])({'|'.join(modules)})(?![A-Za-z])")
  library = [
    str(p.relative_to(ROOT))
    for p in sorted((ROOT / "optax_sm3").rglob("*.py"))
    if word.search(p.read_text())
  ]
  return tests + library


def _top_level_extras(path):
  """The extras whose modules ``path`` imports at its top level."""
  found = set()
  for node in ast.parse(path.read_text()).body:
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
      names = [node.module or ""]
    for name in names:
      found |= {e for e, (mods, _) in EXTRAS.items() if name.split(".")[0] in mods}
  return found


def _test_files():
  return [
    p
    for p in sorted((ROOT / "tests").glob("test_*.py"))
    if p.name not in NEVER and not p.name.startswith(NEVER_PREFIX)
  ]


def multi_extra_files():
  """The test files that import the modules of two extras or more at their top
  level: they run in the ``all`` set, with every extra at its bounds."""
  return [
    str(p.relative_to(ROOT)) for p in _test_files() if len(_top_level_extras(p)) > 1
  ]


def core_ignores():
  """``--ignore=`` for each test file that imports an extra's module at its top
  level (its collection would fail without the extra; importorskip needs none)."""
  return [
    f"--ignore={p.relative_to(ROOT)}"
    for p in sorted((ROOT / "tests").glob("test_*.py"))
    if _top_level_extras(p)
  ]


if __name__ == "__main__":
  command, *args = sys.argv[1:]
  if command == "pins":
    print(" ".join(pins(args)))
  elif command == "core-ignores":
    print(" ".join(core_ignores()))
  elif command == "files":
    (extra,) = args
    print(" ".join(multi_extra_files() if extra == "all" else files(extra)))
  else:
    raise SystemExit(f"unknown command {command!r}: pins, core-ignores or files")
