"""Checks of the documentation sources and, once built, of the site.

``bash scripts/docs.sh`` builds the site, runs every example in it (Sphinx
doctest) and checks the HTML in a browser; CI runs it. These tests guard the
sources (every code block runs, every public name is documented, the
benchmark numbers agree) and, if ``docs/_build/html`` exists, the output.
"""

import inspect
import json
import pathlib
import re
import shutil
import sys

import pytest

import optax_sm3

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
SITE = DOCS / "_build" / "html"
PAGES = sorted(DOCS.glob("**/*.md"))
RST = sorted(DOCS.glob("**/*.rst"))
# Fences that are not Python run nowhere; they must say what they are.
NOT_PYTHON = {"bash", "text", "bibtex"}
# MyST directives whose content is tested (testcode/testoutput) or is not code.
DIRECTIVES = {
  "{testcode}",
  "{testoutput}",
  "{doctest}",
  "{toctree}",
  "{math}",
  "{image}",
  "{literalinclude}",
}


def _fences(text):
  return re.findall(r"^```(\S*)", text, flags=re.MULTILINE)


def test_sources_found():
  assert len(PAGES) >= 8 and len(RST) >= 9, (PAGES, RST)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_every_code_block_runs(page):
  """A Python fence would be shown and never run: it must be a testcode block."""
  # Opening fences have an info string; closing ones are bare (``` alone).
  info = [f for f in _fences(page.read_text()) if f]
  untested = [f for f in info if f not in DIRECTIVES | NOT_PYTHON]
  assert not untested, f"{page.name}: fences {untested} are neither tested nor text"


@pytest.mark.parametrize("page", RST, ids=lambda p: str(p.relative_to(DOCS)))
def test_rst_pages_have_no_untested_code(page):
  text = page.read_text()
  assert not re.search(r"^\s*(\.\. code-block::|\.\. code::|>>> )", text, re.M), page


def test_literalinclude_targets_are_tested_examples():
  text = (DOCS / "getting_started.md").read_text()
  assert "```{literalinclude} ../examples/quickstart.py" in text
  # The hidden testcode next to it runs that very file.
  assert 'ROOT / "examples" / "quickstart.py"' in text


def _documented(rst_text, module):
  names = re.findall(r"^\.\. auto(?:function|class|data):: (\w+)", rst_text, re.M)
  return {f"{module}.{n}" for n in names}


def test_every_public_name_has_an_api_entry():
  api = DOCS / "api"
  documented = set()
  for page in api.glob("*.rst"):
    module = "optax_sm3"
    match = re.search(r"^\.\. currentmodule:: (\S+)", page.read_text(), re.M)
    if match:
      module = match.group(1)
    documented |= _documented(page.read_text(), module)
  missing = {f"optax_sm3.{n}" for n in optax_sm3.__all__} - documented
  assert not missing, f"not in docs/api: {sorted(missing)}"
  for sub in ("nnx", "linen"):
    page = (api / f"{sub}.rst").read_text()
    assert f".. automodule:: optax_sm3.{sub}" in page


@pytest.mark.parametrize("sub", ["nnx", "linen"])
def test_flax_namespaces_fully_documented(sub):
  module = pytest.importorskip(f"optax_sm3.{sub}")
  page = (DOCS / "api" / f"{sub}.rst").read_text()
  missing = set(module.__all__) - {n.split(".")[-1] for n in _documented(page, sub)}
  assert not missing, f"optax_sm3.{sub}: {sorted(missing)} not in docs/api/{sub}.rst"


def _table_rows(text, first_cell):
  return [
    [c.strip() for c in line.strip().strip("|").split("|")]
    for line in text.splitlines()
    if line.startswith(f"| {first_cell} |")
  ]


def test_plot_data_matches_the_tables():
  """The plots are drawn from docs/_data; the tables beside them must agree."""
  data = json.loads((DOCS / "_data" / "benchmarks.json").read_text())
  page = (DOCS / "guides" / "when_to_use.md").read_text()
  for row in data["movielens"]["rows"]:
    (cells,) = _table_rows(page, row["optimizer"])
    assert cells[1] == f"{row['learning_rate']:g}"
    assert cells[2] == f"{row['rmse']:.4f} ± {row['rmse_std']:.4f}"
    assert cells[3] == row["state"]
    assert cells[5] == f"{row['step_ms']:.2f} ms"
  sweep = data["step_time_sweep"]
  header = next(line for line in page.splitlines() if line.startswith("| parameters |"))
  names = [c.strip() for c in header.strip().strip("|").split("|")][1:]
  assert names == list(sweep["ms"])
  for i, size in enumerate(sweep["params_m"]):
    (cells,) = _table_rows(page, f"{size} M")
    assert [float(c) for c in cells[1:]] == [sweep["ms"][n][i] for n in names]
  assert f"`{data['movielens']['command']}`" in page
  assert f"`{sweep['command']}`" in page


def test_loss_curve_data_is_the_results_run():
  """The recipe guide's plot is drawn from the results page's shakespeare-char run."""
  curves = json.loads((DOCS / "_data" / "benchmarks.json").read_text())[
    "transformer_loss_curves"
  ]
  results = (DOCS / "guides" / "results.md").read_text()
  heading = re.search(
    rf"^### {curves['workload']}: test loss after (\d+) steps "
    r"\(mean ± std over (\d+) seeds\)$",
    results,
    re.M,
  )
  assert heading, curves["workload"]
  assert (curves["steps"], curves["seeds"]) == tuple(map(int, heading.groups()))
  table = results[heading.end() : results.index("\n### ", heading.end())]
  assert f"`{curves['command']}`" in results
  assert set(curves["train_loss"]) == set(curves["test_loss"])
  for name, losses in curves["train_loss"].items():
    (row,) = _table_rows(table, name)
    assert row[2].split(" ± ")[0] == f"{curves['test_loss'][name]:.4f}", name
    assert len(losses) == curves["steps"] // curves["chunk"], name
  # The shaded band of the plot is the recipe's cool-down.
  decay = inspect.signature(optax_sm3.sm3_recipe).parameters["decay_fraction"]
  assert curves["cooldown_steps"] == round(decay.default * curves["steps"])
  guide = (DOCS / "guides" / "recipe.md").read_text()
  assert "```{image} ../_generated/transformer_loss_curves.png" in guide


built = pytest.mark.skipif(
  not (SITE / "index.html").exists(), reason="site not built (bash scripts/docs.sh)"
)


@built
def test_built_api_pages_have_every_name():
  for name in optax_sm3.__all__:
    pages = list((SITE / "api").glob("*.html"))
    assert any(f'id="optax_sm3.{name}"' in p.read_text() for p in pages), name


@built
def test_built_site_uses_local_mathjax_and_plots():
  page = (SITE / "api" / "optimizers.html").read_text()
  (src,) = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page)
  assert not src.startswith(("http:", "https:", "//")), src
  assert (SITE / "api" / src.split("?")[0]).resolve().is_file()
  when = (SITE / "guides" / "when_to_use.html").read_text()
  images = re.findall(r'<img[^>]*src="([^"]+\.png)"', when)
  assert len(images) == 2
  for image in images:
    assert (SITE / "guides" / image).resolve().stat().st_size > 10_000
  recipe = (SITE / "guides" / "recipe.html").read_text()
  images = re.findall(r'<img[^>]*src="([^"]+\.png)"', recipe)
  assert [i.rpartition("/")[2] for i in images] == [
    "recipe_loss_curves.png",
    "transfer_loss_curves.png",
    "transformer_loss_curves.png",
  ]
  for image in images:
    assert (SITE / "guides" / image).resolve().stat().st_size > 10_000


def test_transfer_tables_are_the_committed_results():
  """The guide's leave-one-out rows are docs/_data/transfer.json's."""
  data = json.loads((DOCS / "_data" / "transfer.json").read_text())
  guide = (DOCS / "guides" / "recipe.md").read_text()
  rows = [r for r in data["leave_one_out"] if r["budget"] == 0.03]
  assert {r["workload"] for r in rows} == set(data["workloads"])
  for r in rows:
    fmt = "{:.2%}" if "accuracy" in r["metric"] else "{:.4f}"
    cells = [
      f"{fmt.format(r['sm3']['mean'])} ± {fmt.format(r['sm3']['std'])}",
      f"{fmt.format(r['adam_test']['mean'])} ± {fmt.format(r['adam_test']['std'])}",
      f"{r['gap']:+.2%}",
      f"{r['memory']:.1%}",
    ]
    for text in (guide,):
      (row,) = [
        line
        for line in text.splitlines()
        if line.startswith(f"| {r['workload']} | {r['chosen']} |")
      ]
      for cell in cells:
        assert f"| {cell} |" in row, (r["workload"], cell, row)


@built
@pytest.mark.skipif(
  not any(shutil.which(b) for b in ("chromium", "chromium-browser")),
  reason="no chromium (scripts/docs.sh checks the tables where it has one)",
)
@pytest.mark.slow  # a browser; scripts/docs.sh makes the same check on every build
def test_built_tables_fit_a_1280_pixel_page():
  """No table is clipped at 1280 px (tables.css); measured in headless Chromium."""
  sys.path.insert(0, str(DOCS.parent / "scripts"))
  try:
    import check_docs_html
  finally:
    sys.path.pop(0)
  assert (SITE / "_static" / "tables.css").is_file()
  assert check_docs_html.check_table_widths(SITE, width=1280) == []


@pytest.mark.skipif(
  not (DOCS / "_build" / "doctest" / "output.txt").exists(), reason="doctests not run"
)
def test_doctest_run_had_no_failures():
  out = (DOCS / "_build" / "doctest" / "output.txt").read_text()
  tests = sum(int(n) for n in re.findall(r"^\s+(\d+) tests$", out, re.M))
  assert tests >= 15, out
  assert re.search(r"^\s+0 failures in tests$", out, re.M), out


def test_transformer_guide_summary_matches_the_results_tables():
  """The guide's per-workload summary is the results page's full tables, summarised."""
  results = (DOCS / "guides" / "results.md").read_text()
  guide = (DOCS / "guides" / "recipe.md").read_text()
  # The summary of the main benchmark (the transfer study's tables name the
  # same workloads).
  guide = guide.split("## The recipe on every workload, unchanged")[1].split("\n## ")[0]
  sections = dict(
    re.findall(r"^### (\S+): .*?\n(.*?)(?=^### |^## )", results, re.M | re.S)
  )
  assert set(sections) == {"movielens", "shakespeare-word", "shakespeare-char", "mnist"}
  for workload, table in sections.items():
    (row,) = _table_rows(guide, workload)
    metric = {
      r[0]: r[2]
      for r in (
        _table_rows(table, n)[0] for n in ("sm3-recipe", "sm3-m0", "adam", "adam-wsd")
      )
    }
    assert row[2] == metric["sm3-recipe"]
    assert row[5] == metric["sm3-m0"]
    value, adam = re.fullmatch(r"(.+) \((adam|adam-wsd)\)", row[3]).groups()
    assert value == metric[adam]
    # The goal line under the results table names the same tuned Adam.
    assert f"than the tuned Adam ({adam}, chosen on validation)" in table
