"""Sphinx configuration for the optax-sm3 documentation (built by scripts/docs.sh)."""

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
# The sharding guide runs on 8 host devices; XLA reads this before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

import optax_sm3  # noqa: E402

project = "optax-sm3"
author = "optax-sm3 developers"
copyright = "2025, optax-sm3 developers"
release = version = optax_sm3.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.doctest",
  "sphinx.ext.intersphinx",
  "myst_parser",
  # MathJax 3 shipped inside a pip package: the site renders math offline.
  "sphinx-mathjax-offline",
  "benchmark_plots",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_generated/*.json", "README.md"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Only the explicit ``testcode``/``doctest`` blocks of the pages run here; the
# ``>>>`` examples in the docstrings run under pytest --doctest-modules.
doctest_test_doctest_blocks = ""
doctest_global_setup = f"""
import pathlib
ROOT = pathlib.Path({str(ROOT)!r})
"""

# No intersphinx inventories are fetched (the build must work offline).
intersphinx_mapping = {}

html_theme = "sphinx_book_theme"
html_title = "optax-sm3"
html_theme_options = {
  "show_toc_level": 2,
}
# tables.css: the benchmark tables fit a 1280-pixel-wide page (see the file).
html_static_path = ["_static"]
html_css_files = ["tables.css"]
nitpicky = False


def _alias_docstring(app, what, name, obj, options, lines):
  # ``optax_sm3.SM3`` is ``optax_sm3.brainstate.SM3``: its docstring is shown
  # once, at its home (docs/api/brainstate.rst).
  if name == "optax_sm3.SM3":
    lines[:] = ["The same class as :class:`optax_sm3.brainstate.SM3`."]


def setup(app):
  app.connect("autodoc-process-docstring", _alias_docstring)
