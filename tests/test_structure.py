"""The package's shape: modules talk through public names, imports form no cycle."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "optax_sm3"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(tree: ast.Module, module: str, top_level_only: bool):
  """``(imported module, names taken from it, line)`` of ``optax_sm3`` imports."""
  nodes = tree.body if top_level_only else ast.walk(tree)
  package = (
    module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
  )
  for node in nodes:
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "optax_sm3":
          yield alias.name, [], node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(
          package.split(".")[: len(package.split(".")) - node.level + 1]
          + ([base] if base else [])
        )
      if base.split(".")[0] != "optax_sm3":
        continue
      for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in MODULES:  # `from optax_sm3 import _cover`: a module
          yield full, [], node.lineno
        else:
          yield base, [alias.name], node.lineno


def _private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_uses_a_private_name_of_another(module):
  tree = ast.parse(MODULES[module].read_text())
  aliases, bad = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom | ast.Import):
      for imported, names, line in _imports(ast.Module([node], []), module, False):
        bad += [f"line {line}: {imported}.{n}" for n in names if _private(n)]
        if not names:
          alias = next(
            a for a in node.names if imported.endswith(a.name.split(".")[-1])
          )
          aliases[alias.asname or alias.name.split(".")[-1]] = imported
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in aliases
      and aliases[node.value.id] != module
      and _private(node.attr)
    ):
      bad.append(f"line {node.lineno}: {aliases[node.value.id]}.{node.attr}")
  assert not bad, f"{module} uses private names of other modules: {bad}"


def test_module_level_imports_form_no_cycle():
  graph = {}
  for module, path in MODULES.items():
    tree = ast.parse(path.read_text())
    graph[module] = {
      imported for imported, _, _ in _imports(tree, module, True)
      if imported in MODULES and imported != module
    }  # fmt: skip
  done, stack = set(), []

  def visit(module):
    if module in stack:
      cycle = [*stack[stack.index(module) :], module]
      pytest.fail(f"import cycle: {' -> '.join(cycle)}")
    if module in done:
      return
    stack.append(module)
    for imported in sorted(graph[module]):
      visit(imported)
    stack.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)
  assert "optax_sm3._blocks" in done and len(done) == len(MODULES)


MAX_LINES = 600  # Past ~600 lines a module is probably two concerns (STYLE.md).


def test_no_module_is_over_max_lines():
  counts = {
    module: len(path.read_text().splitlines()) for module, path in MODULES.items()
  }
  long = {module: n for module, n in counts.items() if n > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines (split each by concern): {long}"


# The benchmarks may be at most this share of the library's lines (issue #30:
# a benchmark that outgrows what it measures is retired or folded into another).
MAX_BENCHMARK_SHARE = 0.35


def test_benchmarks_stay_under_their_share_of_the_library():
  def lines(folder: pathlib.Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in folder.rglob("*.py"))

  library, benchmarks = lines(ROOT), lines(ROOT.parent / "benchmarks")
  assert benchmarks <= MAX_BENCHMARK_SHARE * library, (
    f"benchmarks are {benchmarks} lines, {benchmarks / library:.1%} of the "
    f"library's {library}; at most {MAX_BENCHMARK_SHARE:.0%}"
  )
