"""CHANGELOG.md keeps its form, and the package's version follows it."""

import datetime
import pathlib
import re

import optax_sm3

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = (ROOT / "CHANGELOG.md").read_text()
RELEASE = re.compile(r"## (\d+)\.(\d+)\.(\d+) - (\d{4}-\d\d-\d\d)$")


def _sections():
  """(heading, body) for each `## ` section, in file order."""
  parts = re.split(r"^(## .*)$", TEXT, flags=re.M)
  return list(zip(parts[1::2], parts[2::2], strict=True))


def _releases():
  return [RELEASE.fullmatch(heading) for heading, _ in _sections()[1:]]


def test_unreleased_first_then_releases_newest_first():
  sections = _sections()
  assert TEXT.startswith("# Changelog\n")
  assert sections[0][0] == "## Unreleased"
  releases = _releases()
  assert releases and all(releases), [h for h, _ in sections[1:]]
  versions = [tuple(int(m[i]) for i in (1, 2, 3)) for m in releases]
  dates = [datetime.date.fromisoformat(m[4]) for m in releases]
  assert versions == sorted(versions, reverse=True)
  assert dates == sorted(dates, reverse=True)


def test_breaking_changes_come_first_each_with_a_migration():
  for heading, body in _sections():
    kinds = re.findall(r"^### (.*)$", body, flags=re.M)
    if "Breaking changes" in kinds:
      assert kinds[0] == "Breaking changes", heading
      breaking = body.split("### Breaking changes", 1)[1].split("\n### ", 1)[0]
      entries = re.split(r"^- ", breaking, flags=re.M)[1:]
      for entry in entries:
        assert "Migration:" in entry, f"{heading}: {entry[:60]!r} has no migration"


def test_version_is_the_next_release_in_development():
  # Between releases the version is the next one's .dev0: past the newest release,
  # a minor step (before 1.0) when Unreleased lists breaking changes.
  newest = tuple(int(_releases()[0][i]) for i in (1, 2, 3))
  m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(\.dev\d+)?", optax_sm3.__version__)
  assert m, optax_sm3.__version__
  version = tuple(int(m[i]) for i in (1, 2, 3))
  if m[4] is None:
    assert version == newest
    return
  assert version > newest
  if "### Breaking changes" in _sections()[0][1]:
    assert version == (newest[0], newest[1] + 1, 0)
