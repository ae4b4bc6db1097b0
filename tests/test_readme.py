"""The README: a front door whose examples run as written and whose account of
the scripts and figures is what they print."""

import contextlib
import io
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _blocks(text, language):
  return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def _assert_first_block_prints_first_output(text):
  code = _blocks(text, "python")[0]
  expected = _blocks(text, "text")[0]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
  assert out.getvalue().split() == expected.split()


def test_quickstart_output_matches_readme():
  _assert_first_block_prints_first_output((ROOT / "README.md").read_text())


def test_quickstart_example_file_matches_readme():
  readme = (ROOT / "README.md").read_text()
  code = _blocks(readme, "python")[0]
  example = (ROOT / "examples" / "quickstart.py").read_text()

  # Compared line by line, ignoring blank lines (isort separates first-party imports).
  def lines(text):
    return "\n".join(line for line in text.splitlines() if line.strip())

  assert lines(code) in lines(example)


def test_flax_sparse_example_output_matches_readme():
  readme = (ROOT / "README.md").read_text()
  _assert_first_block_prints_first_output(
    readme[readme.index("## Sparse embeddings from Flax") :]
  )


def test_sharded_state_table_matches_docs():
  # The script sets XLA_FLAGS for 8 devices itself, so it runs in a fresh process.
  import subprocess
  import sys

  result = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "sharded_state_memory.py")],
    capture_output=True,
    text=True,
    check=True,
    timeout=300,
  )
  rows = [line for line in result.stdout.splitlines() if line.startswith("| `")]
  assert len(rows) == 3
  page = (ROOT / "docs" / "guides" / "scaling_out.md").read_text()
  for row in rows:
    assert row in page, row


def _front_door():
  readme = (ROOT / "README.md").read_text()
  start = readme.index("## Install and the two commands")
  return readme, readme[start : readme.index("\n## ", start + 1)]


def test_readme_says_what_the_main_job_prints():
  """The front door's account of ``bash scripts/main.sh`` is what it prints."""
  import pytest

  from benchmarks import __main__ as main
  from benchmarks import _data, _optimizers, _report, _runner, _workloads

  readme, door = _front_door()
  main_sh = (ROOT / "scripts" / "main.sh").read_text()
  assert 'exec python -m benchmarks "$@"' in main_sh
  assert 'echo "running the benchmarks: python -m benchmarks $*"' in main_sh
  assert "`running the benchmarks: python -m benchmarks`" in door

  args = main.parse_args([])  # main.sh with no flags
  optimizers = [_optimizers.OPTIMIZERS[n] for n in args.optimizers]
  runs = len(args.workloads) * sum(
    args.seeds + len(_runner.subgrid(o.grid, args.grid_size)) for o in optimizers
  )
  assert f"a progress bar over {runs} training runs" in door
  assert (
    f"({len(optimizers)} optimizers, each {args.grid_size} learning rates on the "
    f"validation split, then {args.seeds} seeds)" in " ".join(door.split())
  )
  try:
    workloads = [_workloads.build(name) for name in args.workloads]
  except _data.MissingDataError as error:
    pytest.skip(f"data package missing: {error}")

  # What the default run prints, with made-up numbers: its titles and headers.
  fake = {
    "learning_rate": 0.1,
    "validation": {repr(0.1): 1.0},
    "metric_mean": 1.0,
    "metric_std": 0.0,
    "state_bytes": 1,
    "state_ratio": 1.0,
    "step_ms": 1.0,
    "runs": [{}] * args.seeds,
  }
  results = {
    "workloads": {
      w.name: {
        "metric": w.metric,
        "steps": w.steps,
        "higher_is_better": w.higher_is_better,
        "param_bytes": 1,
        "optimizers": {n: fake for n in args.optimizers},
      }
      for w in workloads
    }
  }
  printed = _report.markdown(results).splitlines()
  titles = [line.removeprefix("### ") for line in printed if line.startswith("### ")]
  assert len(titles) == 1  # "It prints no other table."
  (title,) = titles
  assert f"then one table, `{title}`" in " ".join(door.split())
  assert "It prints no other table." in door
  # The README's copy of that table: same title, header and optimizers, and the
  # rows of the results page's (the full run's) table.
  section = readme[readme.index(f"### {title}\n") :].split("\n## ")[0]
  header = next(line for line in printed if line.startswith("| optimizer |"))
  (table,) = re.findall(r"^\| .*(?:\n\|.*)*", section, re.M)[:1]
  table = [line for line in table.splitlines() if line.startswith("| ")]
  assert table[0] == header
  assert [line.split("|")[1].strip() for line in table[1:]] == args.optimizers
  results = (ROOT / "docs" / "guides" / "results.md").read_text()
  full = results[results.index(f"### {title}\n") :].split("\n### ")[0]
  assert table == [line for line in full.splitlines() if line.startswith("| ")]
  # Every other results table (on the results page) is credited to `--workloads all`.
  others = re.findall(r"^### (\S+):", results, re.M)
  assert others[0] == args.workloads[0]
  (credit,) = [
    line
    for line in door.splitlines()
    if line.startswith("| ") and "`bash scripts/main.sh --workloads all`" in line
  ]
  for name in others[1:]:
    assert f"`{name}`" in credit, name
  assert set(others) == set(_workloads.WORKLOAD_NAMES)


def test_readme_says_what_the_test_script_prints():
  _, door = _front_door()
  test_sh = (ROOT / "scripts" / "test.sh").read_text()
  assert 'echo "running the tests: python -m pytest -n 2 --dist loadfile $*"' in test_sh
  assert 'exec python -m pytest -n 2 --dist loadfile "$@"' in test_sh
  assert "`running the tests: python -m pytest -n 2 --dist loadfile`" in door


def test_ci_runs_what_the_default_test_run_skips():
  """The README's test command skips the slow tier; CI runs it right after."""
  ci = (ROOT / ".ci" / "run").read_text()
  readme = (ROOT / "README.md").read_text()
  slow_tier = 'bash scripts/test.sh -m "slow or hypothesis" --slow'
  assert ci.index("\nbash scripts/test.sh\n") < ci.index(f"\n{slow_tier}\n")
  assert f"`{slow_tier}`" in readme


def test_readme_is_a_front_door():
  """At most 200 lines, holding what a newcomer needs and pointing to the rest."""
  readme = (ROOT / "README.md").read_text()
  assert len(readme.rstrip("\n").splitlines()) <= 200
  headings = re.findall(r"^## (.+)$", readme, re.M)
  assert headings == [
    "Install and the two commands",
    "Quick example",
    "Sparse embeddings from Flax and Equinox",
    "Results",
    "Documentation",
    "Development",
    "Citation and license",
  ]
  # Every page the README names is a page of the docs.
  pages = {
    re.search(r"^# (.+)$", p.read_text(), re.M)[1]
    for p in (ROOT / "docs").rglob("*.md")
    if not p.is_relative_to(ROOT / "docs" / "_build")
  }
  door = readme[readme.index("## Documentation") :].split("\n## ")[0]
  named = re.findall(r"\*([A-Z][^*]+)\*", " ".join(door.split()))
  assert len(named) >= 9 and set(named) <= pages, set(named) - pages
  # The development section states the type check's level and command.
  dev = readme[readme.index("## Development") :].split("\n## ")[0]
  assert "basic mode" in dev and "`python -m pyright`" in dev
