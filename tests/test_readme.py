"""The README's quick example runs as written and prints what the README shows."""

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
