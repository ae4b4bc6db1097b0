"""Checks the built documentation site (docs/_build/html) like a reader would.

1. Every local link (``href``/``src`` in every page) points at a file that
   exists, and every ``#anchor`` at an ``id`` in that file.
2. Headless Chromium renders the API page's ``.. math::`` blocks: after the
   page's JavaScript has run, the DOM holds MathJax output (``mjx-container``)
   and no MathJax error (``merror``).
3. At a 1280-pixel-wide page, every table fits the article column (a wider
   one is clipped by the theme's scrolling box), measured in headless Chromium.

Usage: ``python scripts/check_docs_html.py [--no-browser] [docs/_build/html]``.
Exits 1 with one line per problem. Set ``CHROMIUM`` to the browser's path if it
is not ``chromium`` or ``chromium-browser`` on the PATH; ``--no-browser`` checks
the links only (``scripts/docs.sh`` passes it where no browser can be had).
"""

from __future__ import annotations

import html
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


def _dump_dom(url: str, *flags: str) -> str:
  """The DOM of ``url`` after its JavaScript ran (headless Chromium)."""
  browser = _chromium()
  assert browser is not None
  return subprocess.run(
    [
      browser,
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--allow-file-access-from-files",
      "--virtual-time-budget=10000",
      *flags,
      "--dump-dom",
      url,
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  ).stdout


def check_math(site: pathlib.Path, page: str) -> list[str]:
  """Problems with the rendered math of ``page``, after its JavaScript ran."""
  if _chromium() is None:
    return ["no chromium on the PATH (apt-get install chromium, or set CHROMIUM)"]
  dom = _dump_dom((site / page).resolve().as_uri())
  rendered = dom.count("<mjx-container")
  print(f"math: {rendered} MathJax-rendered formulas in {page}")
  problems = []
  if rendered == 0:
    problems.append(f"{page}: no mjx-container after JavaScript (MathJax did not run)")
  if "<mjx-merror" in dom or 'class="merror"' in dom:
    problems.append(f"{page}: MathJax reported an error in a formula")
  return problems


# Loads every page in a frame of the given width and reports each table wider
# than the box it sits in (the theme clips it to a scrolling container).
_TABLE_CHECK = r"""<!DOCTYPE html><html><body>
{frames}
<script>
window.addEventListener("load", () => {{
  const lines = [];
  for (const frame of document.querySelectorAll("iframe")) {{
    const doc = frame.contentDocument;
    if (!doc || !doc.body) {{ lines.push(frame.dataset.page + "\tnot loaded"); continue; }}
    const tables = doc.querySelectorAll(".bd-article table");
    lines.push(frame.dataset.page + "\ttables " + tables.length);
    tables.forEach((table, i) => {{
      const box = table.parentElement;
      const need = Math.ceil(table.getBoundingClientRect().width);
      const have = Math.floor(box.getBoundingClientRect().width);
      if (need > have + 1) {{
        const head = (table.querySelector("th, td") || {{}}).textContent || "";
        lines.push(frame.dataset.page + "\twide " + (i + 1) + " " + need + " " + have
                   + " " + head.trim());
      }}
    }});
  }}
  const out = document.createElement("pre");
  out.id = "table-check";
  out.textContent = lines.join("\n");
  document.body.appendChild(out);
}});
</script></body></html>
"""


def check_table_widths(site: pathlib.Path, width: int = 1280) -> list[str]:
  """Tables that do not fit a page ``width`` pixels wide, one line each."""
  if _chromium() is None:
    return ["no chromium on the PATH (apt-get install chromium, or set CHROMIUM)"]
  pages = sorted(
    str(p.relative_to(site))
    for p in site.rglob("*.html")
    if p.relative_to(site).parts[0] not in ("_static", "_sources")
    and p.name not in ("genindex.html", "search.html", "_table_check.html")
  )
  frames = "\n".join(
    f'<iframe data-page="{page}" src="{page}" '
    f'style="width:{width}px;height:800px;border:0"></iframe>'
    for page in pages
  )
  wrapper = site / "_table_check.html"
  wrapper.write_text(_TABLE_CHECK.format(frames=frames), encoding="utf-8")
  try:
    dom = _dump_dom(wrapper.resolve().as_uri(), f"--window-size={width + 40},900")
  finally:
    wrapper.unlink()
  start = dom.find('<pre id="table-check">')
  if start < 0:
    return [f"tables: the width check did not run in {wrapper.name}"]
  report = html.unescape(dom[start : dom.index("</pre>", start)].split(">", 1)[1])
  problems, n_tables, n_pages = [], 0, 0
  for line in report.splitlines():
    page, what = line.split("\t", 1)
    if what == "not loaded":
      problems.append(f"{page}: did not load for the table-width check")
    elif what.startswith("tables "):
      n_pages += 1
      n_tables += int(what.split()[1])
    else:
      _, index, need, have, head = [*what.split(" ", 4), ""][:5]
      problems.append(
        f"{page}: table {index} (first cell {head!r}) is {need} px wide in a "
        f"{have} px column at a {width} px page: it is clipped"
      )
  print(
    f"tables: {n_tables} tables in {n_pages} pages at {width} px wide, "
    f"{len(problems)} clipped"
  )
  if n_pages != len(pages):
    problems.append(f"tables: checked {n_pages} of {len(pages)} pages")
  return problems


def main(argv: list[str]) -> int:
  args = argv[1:]
  browser = "--no-browser" not in args
  args = [a for a in args if a != "--no-browser"]
  site = pathlib.Path(args[0] if args else "docs/_build/html")
  if not (site / "index.html").exists():
    print(f"{site}/index.html not found: build the site first (bash scripts/docs.sh)")
    return 1
  problems = check_links(site)
  if browser:
    for page in MATH_PAGES:
      problems += check_math(site, page)
    problems += check_table_widths(site)
  else:
    print("math and table widths: not checked (--no-browser)")
  for problem in problems:
    print("  " + problem)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
