"""Shared pytest configuration.

Tests marked ``slow`` (multi-device worker processes, long trainings, tiny
benchmark runs) are skipped unless pytest gets ``--slow``; with ``--slow`` the
property tests also run the ``full`` hypothesis profile.
"""

import os

import hypothesis
import jax
import pytest

# Cheap insurance against silent broadcasting bugs (as optimistix does).
jax.config.update("jax_numpy_rank_promotion", "raise")

hypothesis.settings.register_profile(
  "ci", max_examples=20, deadline=None, derandomize=True, print_blob=True
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
  if config.getoption("--slow", default=False):
    hypothesis.settings.load_profile("full")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--slow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
