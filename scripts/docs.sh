#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html/ (warnings are errors),
# runs every example in it (Sphinx doctest), and checks the built HTML in
# headless Chromium (rendered math, internal links). One line per phase.
# Usage: bash scripts/docs.sh   (DOCS_NO_INSTALL=1: use the environment as is)
set -euo pipefail
cd "$(dirname "$0")/.."
phase() { printf '[docs] %-8s %s\n' "$1" "$2"; }

start=$SECONDS
if [ -z "${DOCS_NO_INSTALL:-}" ]; then
  python -m pip install --quiet --disable-pip-version-check -e ".[docs]"
  if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
    && [ -z "${CHROMIUM:-}" ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
  fi
  phase install "ok ($((SECONDS - start)) s): .[docs] and chromium"
else
  phase install "skipped (DOCS_NO_INSTALL set)"
fi

start=$SECONDS
rm -rf docs/_build/html docs/_build/doctree
python -m sphinx -b html -W --keep-going -q -d docs/_build/doctree docs docs/_build/html
phase html "ok ($((SECONDS - start)) s): docs/_build/html/index.html"

start=$SECONDS
python -m sphinx -b doctest -W --keep-going -q -d docs/_build/doctree docs docs/_build/doctest
phase doctest "ok ($((SECONDS - start)) s): $(sed -n '/Doctest summary/,$p' docs/_build/doctest/output.txt | grep -Eo '[0-9]+ tests' | head -1), 0 failures"

start=$SECONDS
python scripts/check_docs_html.py docs/_build/html | sed 's/^/[docs]          /'
phase browser "ok ($((SECONDS - start)) s): math rendered, links resolve"
