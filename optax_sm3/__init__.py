"""optax-sm3: the SM3 optimizer (Anil et al., 2019) for JAX and optax.

SM3 adapts a learning rate per parameter entry like AdaGrad or Adam, but keeps
one accumulator per tensor axis (the maxima of a cover of the entries), so its
state costs ``O(sum of dims)`` instead of ``O(prod of dims)``.
"""

from typing import TYPE_CHECKING

from optax_sm3._convert import from_optax_sm3
from optax_sm3._momentum import ScaleByMomentumState, scale_by_momentum
from optax_sm3._polyak import PolyakState, polyak_averaging, polyak_params
from optax_sm3._recipe import sm3_recipe
from optax_sm3._scale_by_sm3 import ScaleBySM3State, scale_by_sm3
from optax_sm3._schedules import warmup_schedule
from optax_sm3._sharding import state_partition_specs, state_shardings
from optax_sm3._sm3 import sm3
from optax_sm3._sparse._accumulate import (
  SparseMultiSteps,
  SparseMultiStepsState,
  sparse_grad_mean,
  sparse_grad_sum,
  sparse_multi_steps,
)
from optax_sm3._sparse._grad import sparse_lookup, sparse_value_and_grad
from optax_sm3._sparse._rows import SparseRows, SparseRowsState, sparse_rows
from optax_sm3._sparse._tables import SparseTables, SparseTablesState, sparse_tables
from optax_sm3._sparse._types import SparseGrad
from optax_sm3._weight_decay import WeightDecayState

if TYPE_CHECKING:  # imported on first use: see __getattr__
  from optax_sm3.brainstate import SM3

__version__ = "0.3.0.dev0"

__all__ = (
  "SM3",
  "PolyakState",
  "ScaleByMomentumState",
  "ScaleBySM3State",
  "WeightDecayState",
  "SparseGrad",
  "SparseMultiSteps",
  "SparseMultiStepsState",
  "SparseRows",
  "SparseRowsState",
  "SparseTables",
  "SparseTablesState",
  "from_optax_sm3",
  "polyak_averaging",
  "polyak_params",
  "scale_by_momentum",
  "scale_by_sm3",
  "sm3",
  "sm3_recipe",
  "sparse_grad_mean",
  "sparse_grad_sum",
  "sparse_lookup",
  "sparse_multi_steps",
  "sparse_rows",
  "sparse_tables",
  "sparse_value_and_grad",
  "state_partition_specs",
  "state_shardings",
  "warmup_schedule",
)


def __getattr__(name: str):
  # `optax_sm3.nnx` and `optax_sm3.linen` need Flax, `optax_sm3.equinox`
  # Equinox, `optax_sm3.brainstate` (home of `SM3`) is for brainstate:
  # imported on first use only.
  if name in ("nnx", "linen", "equinox", "brainstate", "SM3"):
    import importlib

    if name == "SM3":
      return importlib.import_module("optax_sm3.brainstate").SM3
    return importlib.import_module(f"optax_sm3.{name}")
  raise AttributeError(f"module 'optax_sm3' has no attribute {name!r}")
