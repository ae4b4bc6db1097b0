"""The Flax examples train: their loss falls below a threshold in few steps."""

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("flax")

_EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, _EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  # Flax modules are dataclasses, which look their module up in sys.modules.
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # a whole example's training (the embedding one runs by default)
def test_flax_mlp_example():
  # Starts near 0.6 (the variance of the target).
  assert _load("flax_mlp").main(steps=80) < 0.1


def test_flax_embedding_example():
  # Starts near 1.0 (the variance of the target).
  assert _load("flax_embedding").main(steps=120, vocab=2000, dim=16) < 0.5
