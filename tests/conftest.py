"""Shared pytest configuration."""

import os

import hypothesis
import jax

# Cheap insurance against silent broadcasting bugs (as optimistix does).
jax.config.update("jax_numpy_rank_promotion", "raise")

hypothesis.settings.register_profile(
  "ci", max_examples=45, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.register_profile("dev", max_examples=25, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
