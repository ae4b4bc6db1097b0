"""Which parametrizations the default run takes, and which wait for ``--slow``.

The default run (the README's test command) checks every concern once; the
``--slow`` run, which CI also makes, repeats it over every parametrization.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import pytest

slow_run = False  # set by conftest.py from --slow, before any test module loads


def examples(slow: int, fast: int) -> int:
  """A property test's ``max_examples``: ``slow`` with ``--slow``, else ``fast``."""
  return slow if slow_run else fast


def fast_first(values: Iterable, fast: Collection) -> list:
  """``values`` for ``pytest.mark.parametrize``: those in ``fast`` run by default,
  every other one is marked ``slow`` (it runs with ``--slow``)."""
  return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]
