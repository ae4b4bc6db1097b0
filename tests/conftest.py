"""Shared pytest configuration.

Tests marked ``slow`` (multi-device worker processes, long trainings, tiny
benchmark runs, and the parametrizations ``_tiers.fast_first`` leaves out of
the default run) are skipped unless pytest gets ``--slow``; with ``--slow`` the
property tests also run the ``full`` hypothesis profile. CI runs both: the
default run, then ``-m "slow or hypothesis" --slow``.
"""

import os

import _tiers
import hypothesis
import jax
import pytest

# Cheap insurance against silent broadcasting bugs (as optimistix does).
jax.config.update("jax_numpy_rank_promotion", "raise")

hypothesis.settings.register_profile(
  "ci", max_examples=10, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.register_profile(
  "full", max_examples=45, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.register_profile("dev", max_examples=25, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_addoption(parser):
  parser.addoption(
    "--slow",
    action="store_true",
    help="also run the tests marked slow, with the full hypothesis profile",
  )


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "slow: multi-device workers, long trainings; run with --slow"
  )
  _tiers.slow_run = config.getoption("--slow", default=False)
  if _tiers.slow_run:
    hypothesis.settings.load_profile("full")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--slow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
