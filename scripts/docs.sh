#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html/ (warnings are errors),
# runs every example in it (Sphinx doctest), checks every internal link, and
# checks in headless Chromium that the math renders and that every table fits
# a 1280-pixel-wide page. One line per phase.
#
# Needs: Python >= 3.11 and pip (it installs the [docs] extra). The browser check
# needs Chromium: `chromium` or `chromium-browser` on the PATH, or CHROMIUM set to
# the browser's path. Without one, the script installs Debian's `chromium` package
# with apt-get, which needs a Debian or Ubuntu system and root or passwordless sudo.
# Where no browser can be had, the browser check is skipped with a message saying
# why (the build, the examples and the link check still run); under CI (CI set),
# a missing browser is an error, so CI always runs the browser check.
#
# Usage: bash scripts/docs.sh   (DOCS_NO_INSTALL=1: use the environment as is,
# install nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
phase() { printf '[docs] %-8s %s\n' "$1" "$2"; }

have_browser() {
  { [ -n "${CHROMIUM:-}" ] && command -v "$CHROMIUM"; } \
    || command -v chromium || command -v chromium-browser
}

# Installs Debian's chromium with apt-get; on failure sets `why` and returns 1.
install_browser() {
  local as_root=()
  if ! command -v apt-get >/dev/null; then
    why="no apt-get here (not a Debian or Ubuntu system)"
    return 1
  fi
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      as_root=(sudo -n)
    else
      why="apt-get needs root or passwordless sudo, and this is neither"
      return 1
    fi
  fi
  echo "installing Debian's chromium with ${as_root[*]:+${as_root[*]} }apt-get (for the browser check)..."
  # The package lists may be missing or stale: update them only if needed.
  "${as_root[@]}" apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { "${as_root[@]}" apt-get update -qq && "${as_root[@]}" apt-get install -y -qq chromium >/dev/null; } \
    || { why="apt-get install chromium failed (see its output above)"; return 1; }
}

why=""
start=$SECONDS
if [ -z "${DOCS_NO_INSTALL:-}" ]; then
  install_project docs
  browser_note="chromium already there"
  if ! have_browser >/dev/null; then
    if install_browser; then
      browser_note="chromium installed"
    else
      browser_note="no chromium ($why)"
    fi
  fi
  phase install "ok ($((SECONDS - start)) s): .[docs]; $browser_note"
else
  phase install "skipped (DOCS_NO_INSTALL set)"
  have_browser >/dev/null || why="no chromium on the PATH and DOCS_NO_INSTALL set"
fi

start=$SECONDS
rm -rf docs/_build/html docs/_build/doctree
python -m sphinx -b html -W --keep-going -q -d docs/_build/doctree docs docs/_build/html
phase html "ok ($((SECONDS - start)) s): docs/_build/html/index.html"

start=$SECONDS
python -m sphinx -b doctest -W --keep-going -q -d docs/_build/doctree docs docs/_build/doctest
phase doctest "ok ($((SECONDS - start)) s): $(sed -n '/Doctest summary/,$p' docs/_build/doctest/output.txt | grep -Eo '[0-9]+ tests' | head -1), 0 failures"

start=$SECONDS
if have_browser >/dev/null; then
  python scripts/check_docs_html.py docs/_build/html | sed 's/^/[docs]          /'
  phase browser "ok ($((SECONDS - start)) s): math rendered, tables fit a 1280 px page, links resolve"
elif [ -n "${CI:-}" ]; then
  python scripts/check_docs_html.py --no-browser docs/_build/html | sed 's/^/[docs]          /'
  phase browser "FAILED: ${why:-no chromium}; CI must run the browser check" >&2
  exit 1
else
  python scripts/check_docs_html.py --no-browser docs/_build/html | sed 's/^/[docs]          /'
  phase browser "SKIPPED: ${why:-no chromium}. Links resolve; the math and the table widths were not checked."
  phase browser "To check it: install Chromium (Debian: apt-get install chromium) or set CHROMIUM, and rerun."
fi
