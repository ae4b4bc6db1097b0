"""optax-sm3: the SM3 optimizer (Anil et al., 2019) for JAX and optax.

SM3 adapts a learning rate per parameter entry like AdaGrad or Adam, but keeps
one accumulator per tensor axis (the maxima of a cover of the entries), so its
state costs ``O(sum of dims)`` instead of ``O(prod of dims)``.
"""

from optax_sm3._adapter import SM3
from optax_sm3._momentum import ScaleByMomentumState, scale_by_momentum
from optax_sm3._scale_by_sm3 import ScaleBySM3State, scale_by_sm3
from optax_sm3._schedules import warmup_schedule
from optax_sm3._sharding import state_partition_specs, state_shardings
from optax_sm3._sm3 import sm3
from optax_sm3._sparse import SparseRows, SparseRowsState, sparse_rows

__version__ = "0.1.0"

__all__ = (
  "SM3",
  "ScaleByMomentumState",
  "ScaleBySM3State",
  "SparseRows",
  "SparseRowsState",
  "scale_by_momentum",
  "scale_by_sm3",
  "sm3",
  "sparse_rows",
  "state_partition_specs",
  "state_shardings",
  "warmup_schedule",
)
