"""Every sparse train step we show is jitted with donation, and is what we time.

Without donation the arrays passed to a jitted step stay alive, so XLA must
copy the whole embedding table to produce the new one, and the sparse step
costs ``O(V * D)`` again (about 3x over dense SM3 at 2**20 x 64 rows instead
of over 50x). These tests parse the Python in README.md, docs/guides/*.md and
examples/*.py and fail when a training step in code that uses the sparse API
is jitted without donating, and when a sparse step the README or a guide
shows is not, line for line, one that ``benchmarks/sparse_taught.py`` times.
"""

import ast
import json
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARK = ROOT / "benchmarks" / "sparse_taught.py"
# Names whose presence makes a code unit use the sparse API.
SPARSE_NAMES = (
  "sparse_rows",
  "sparse_tables",
  "sparse_lookup",
  "sparse_value_and_grad",
  "SparseEmbed",
  "SparseEmbedding",
  "SparseOptimizer",
  "optax_sm3.nnx",
  "optax_sm3.linen",
  "optax_sm3.equinox",
)
JITS = {"jit", "filter_jit"}
STEP_METHODS = {"update", "step", "apply_gradients"}


def _doc_units(path):
  """``(name, code)`` of every Python fence (and MyST testcode) in ``path``."""
  text = path.read_text()
  blocks = re.findall(r"^```(python|\{testcode\})\n(.*?)^```", text, re.M | re.S)
  return [(f"{path.name} block {i}", code) for i, (_, code) in enumerate(blocks)]


def _units():
  units = _doc_units(ROOT / "README.md")
  for page in sorted((ROOT / "docs" / "guides").glob("*.md")):
    units += _doc_units(page)
  for example in sorted((ROOT / "examples").glob("*.py")):
    units.append((f"examples/{example.name}", example.read_text()))
  return units


def _is_jit(node) -> bool:
  """``jit`` / ``jax.jit`` / ``nnx.jit`` / ``eqx.filter_jit`` (a name)."""
  if isinstance(node, ast.Attribute):
    return node.attr in JITS
  return isinstance(node, ast.Name) and node.id in JITS


def _jit_call(node):
  """The keywords of a jit given by ``node`` (a decorator or a call), or None.

  ``jit`` alone gives ``[]``; ``jit(...)`` and ``functools.partial(jit,
  ...)`` give their keywords.
  """
  if _is_jit(node):
    return []
  if isinstance(node, ast.Call):
    if _is_jit(node.func):
      return node.keywords
    func = node.func
    is_partial = (isinstance(func, ast.Attribute) and func.attr == "partial") or (
      isinstance(func, ast.Name) and func.id == "partial"
    )
    if is_partial and node.args and _is_jit(node.args[0]):
      return node.keywords
  return None


def _donates(keywords) -> bool:
  for k in keywords:
    if k.arg in ("donate_argnums", "donate_argnames"):
      value = k.value
      return not (isinstance(value, (ast.Tuple, ast.List)) and not value.elts)
    if k.arg == "donate":
      return not (isinstance(k.value, ast.Constant) and k.value.value == "none")
  return False


def _takes_a_step(function) -> bool:
  """Whether ``function``'s body calls an optimizer's update / step."""
  return any(
    isinstance(node, ast.Call)
    and isinstance(node.func, ast.Attribute)
    and node.func.attr in STEP_METHODS
    for node in ast.walk(function)
  )


def jitted_steps(code: str):
  """``(name, donates, function node or None)`` of each jitted training step."""
  tree = ast.parse(code)
  functions = {
    node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
  }
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef):
      for decorator in node.decorator_list:
        keywords = _jit_call(decorator)
        if keywords is not None and _takes_a_step(node):
          found.append((node.name, _donates(keywords), node))
    elif isinstance(node, ast.Call) and _is_jit(node.func) and node.args:
      target = node.args[0]
      if isinstance(target, ast.Attribute) and target.attr in STEP_METHODS:
        found.append((ast.unparse(target), _donates(node.keywords), None))
      elif isinstance(target, ast.Name) and target.id in functions:
        if _takes_a_step(functions[target.id]):
          found.append((target.id, _donates(node.keywords), functions[target.id]))
  return found


def _uses_sparse(code: str) -> bool:
  return any(name in code for name in SPARSE_NAMES)


def _sparse_units():
  return [(name, code) for name, code in _units() if _uses_sparse(code)]


def test_checker_catches_a_step_without_donation():
  bad = (
    "@nnx.jit\n"
    "def train_step(model, optimizer, ids, y):\n"
    "  optimizer.update(model, grads)\n"
    "fast = jax.jit(opt.update)\n"
    "@functools.partial(jax.jit, donate_argnums=())\n"
    "def f(p, s):\n"
    "  return opt.step(p, g, s)\n"
    "@eqx.filter_jit(donate='none')\n"
    "def g(m, s):\n"
    "  return opt.step(m, g, s)\n"
  )
  assert [(n, d) for n, d, _ in jitted_steps(bad)] == [
    ("train_step", False),
    ("f", False),
    ("g", False),
    ("opt.update", False),
  ]
  good = (
    "@nnx.jit(donate_argnums=(0, 1))\n"
    "def train_step(model, optimizer, ids, y):\n"
    "  optimizer.update(model, grads)\n"
    "@eqx.filter_jit(donate='all')\n"
    "def g(m, s):\n"
    "  return opt.step(m, g, s)\n"
    "fast = jax.jit(opt.update, donate_argnums=(2, 3))\n"
    "@jax.jit\n"
    "def evaluate(model, ids):\n"
    "  return model(ids)\n"
  )
  assert all(d for _, d, _ in jitted_steps(good)) and len(jitted_steps(good)) == 3


def test_sparse_units_found():
  names = [name for name, _ in _sparse_units()]
  assert any(n.startswith("README.md") for n in names), names
  assert any(n.startswith("sparse_embeddings.md") for n in names), names
  assert "examples/movielens_sparse.py" in names
  assert "examples/nnx_sparse_embedding.py" in names


@pytest.mark.parametrize(("name", "code"), _sparse_units(), ids=lambda x: str(x)[:40])
def test_sparse_steps_are_donated(name, code):
  steps = jitted_steps(code)
  undonated = [step for step, donates, _ in steps if not donates]
  assert not undonated, (
    f"{name}: {undonated} jitted without donation; XLA then copies the whole "
    "table every step (donate the model/params and the optimizer state)"
  )


def _lines(text: str) -> list[str]:
  return [line.strip() for line in text.splitlines() if line.strip()]


def _contains(haystack: list[str], needle: list[str]) -> bool:
  n = len(needle)
  return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def _taught_steps():
  """Each sparse train step a README or guide block defines, as source lines."""
  taught = []
  for name, code in _sparse_units():
    if name.startswith("examples/"):
      continue
    for step, _, function in jitted_steps(code):
      if function is not None:
        source = ast.get_source_segment(code, function, padded=False)
        first = min(d.lineno for d in function.decorator_list) - 1
        decorators = code.splitlines()[first : function.lineno - 1]
        taught.append(
          (f"{name}: {step}", _lines("\n".join(decorators) + "\n" + source))
        )
  return taught


def test_taught_steps_found():
  names = " ".join(name for name, _ in _taught_steps())
  for step in ("train_step", "linen_step", "eqx_step"):
    assert "README.md block" in names and step in names, names


@pytest.mark.parametrize(("name", "lines"), _taught_steps(), ids=lambda x: str(x)[:50])
def test_taught_steps_are_the_benchmarked_ones(name, lines):
  benchmark = _lines(BENCHMARK.read_text())
  assert _contains(benchmark, lines), (
    f"{name} is not, line for line, a step benchmarks/sparse_taught.py times; "
    "update the benchmark (and its table in the README and the sparse guide)"
  )


def test_nnx_routes_time_the_taught_step():
  """``nnx`` and ``nnx_plain`` call the README's ``train_step`` itself."""
  tree = ast.parse(BENCHMARK.read_text())
  (route,) = [
    node
    for node in ast.walk(tree)
    if isinstance(node, ast.FunctionDef) and node.name == "nnx_route"
  ]
  assert "train_step" in [
    n.name for n in ast.walk(route) if isinstance(n, ast.FunctionDef)
  ]
  callers = {
    ast.unparse(node.func)
    for node in ast.walk(route)
    if isinstance(node, ast.Call)
    and node.args
    and isinstance(node.args[0], ast.Name)
    and node.args[0].id == "train_step"
  }
  assert callers == {"nnx.cached_partial", "functools.partial"}, callers


@pytest.mark.slow
def test_benchmark_runs_and_both_paths_agree(tmp_path):
  """A tiny run of the benchmark: every route and momentum, sparse = dense losses."""
  from benchmarks import sparse_taught

  tiny = ["--rows", "512", "--runs", "1", "--steps", "1", "--dense-steps", "1"]
  summary = sparse_taught.main([*tiny, "--out", str(tmp_path)])
  assert {(r["route"], r["momentum"]) for r in summary} == {
    (route, m) for route in sparse_taught.ROUTES for m in sparse_taught.MOMENTA
  }
  assert all(r["max_loss_rel_diff"] <= sparse_taught.LOSS_RTOL for r in summary)
  for r in summary:
    assert r["speedup"] == pytest.approx(r["dense_median_s"] / r["sparse_median_s"])
  # The two NNX routes run one step: their losses agree.
  records = json.loads((tmp_path / "sparse_taught.json").read_text())["records"]
  for m in sparse_taught.MOMENTA:
    losses = {
      r["route"]: r["warmup_losses"]
      for r in records
      if r["momentum"] == m and r["route"].startswith("nnx")
    }
    np.testing.assert_allclose(losses["nnx_plain"], losses["nnx"], rtol=1e-6)
  table = (tmp_path / "sparse_taught.md").read_text()
  assert "`python -m benchmarks.sparse_taught --rows 512" in table
  assert "512 x 64 float32 table" in table and "| nnx_plain | 0 |" in table
  assert "--out" not in table
