"""Checks the built documentation site (docs/_build/html) like a reader would.

1. Every local link (``href``/``src`` in every page) points at a file that
   exists, and every ``#anchor`` at an ``id`` in that file.
2. Headless Chromium renders the API page's ``.. math::`` blocks: after the
   page's JavaScript has run, the DOM holds MathJax output (``mjx-container``)
   and no MathJax error (``merror``).

Usage: ``python scripts/check_docs_html.py [docs/_build/html]``. Exits 1 with
one line per problem. Set ``CHROMIUM`` to the browser's path if it is not
``chromium`` or ``chromium-browser`` on the PATH.
"""

from __future__ import annotations

import html.parser
import os
import pathlib
import shutil
import subprocess
import sys
import urllib.parse

# Pages whose math must render: an API page (docstring ``.. math::``) and a
# Markdown page (MyST ``{math}`` and ``$...$``).
MATH_PAGES = ("api/optimizers.html", "getting_started.html")


class _Page(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.ids: set[str] = set()
    self.links: list[str] = []

  def handle_starttag(self, tag, attrs):
    for name, value in attrs:
      if name in ("id", "name") and value:
        self.ids.add(value)
      if value and (
        (name == "href" and tag in ("a", "link")) or (name == "src" and tag != "iframe")
      ):
        self.links.append(value)


def _parse(path: pathlib.Path) -> _Page:
  page = _Page()
  page.feed(path.read_text(encoding="utf-8"))
  return page


def check_links(site: pathlib.Path) -> list[str]:
  """Problems with local links, as ``page: link (why)`` lines."""
  pages = {
    p: _parse(p)
    for p in site.rglob("*.html")
    # Theme templates copied as static files are not pages.
    if p.relative_to(site).parts[0] not in ("_static", "_sources")
  }
  problems = []
  n_links = 0
  for page_path, page in pages.items():
    for link in page.links:
      parts = urllib.parse.urlsplit(link)
      if parts.scheme or parts.netloc or link.startswith(("mailto:", "data:")):
        continue  # external: not checked (the build is offline)
      n_links += 1
      target = (
        (page_path.parent / urllib.parse.unquote(parts.path)).resolve()
        if parts.path
        else page_path
      )
      rel = page_path.relative_to(site)
      if not target.exists():
        problems.append(f"{rel}: {link} (no such file)")
        continue
      if target.is_dir():
        target = target / "index.html"
      if parts.fragment and target.suffix == ".html":
        ids = pages[target].ids if target in pages else _parse(target).ids
        if urllib.parse.unquote(parts.fragment) not in ids:
          problems.append(f"{rel}: {link} (no anchor #{parts.fragment})")
  print(f"links: {n_links} local links in {len(pages)} pages, {len(problems)} broken")
  return problems


def _chromium() -> str | None:
  for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def check_math(site: pathlib.Path, page: str) -> list[str]:
  """Problems with the rendered math of ``page``, after its JavaScript ran."""
  browser = _chromium()
  if browser is None:
    return ["no chromium on the PATH (apt-get install chromium, or set CHROMIUM)"]
  url = (site / page).resolve().as_uri()
  dom = subprocess.run(
    [
      browser,
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--allow-file-access-from-files",
      "--virtual-time-budget=10000",
      "--dump-dom",
      url,
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  ).stdout
  rendered = dom.count("<mjx-container")
  print(f"math: {rendered} MathJax-rendered formulas in {page}")
  problems = []
  if rendered == 0:
    problems.append(f"{page}: no mjx-container after JavaScript (MathJax did not run)")
  if "<mjx-merror" in dom or 'class="merror"' in dom:
    problems.append(f"{page}: MathJax reported an error in a formula")
  return problems


def main(argv: list[str]) -> int:
  site = pathlib.Path(argv[1] if len(argv) > 1 else "docs/_build/html")
  if not (site / "index.html").exists():
    print(f"{site}/index.html not found: build the site first (bash scripts/docs.sh)")
    return 1
  problems = check_links(site)
  for page in MATH_PAGES:
    problems += check_math(site, page)
  for problem in problems:
    print("  " + problem)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
