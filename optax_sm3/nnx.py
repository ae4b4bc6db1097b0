"""Flax NNX integration: embeddings trained one looked-up row at a time.

``SparseEmbed`` is a drop-in for ``nnx.Embed``; :func:`value_and_grad` (or
:func:`grad`) returns each SparseEmbed table's gradient as a
:class:`SparseGrad` ``(indices, row_grads)`` without forming a table-sized
array; :class:`SparseOptimizer` steps the tables with exact row-sparse SM3
(:func:`optax_sm3.sparse_rows`) and the other parameters with any optax
transformation. Needs Flax: ``pip install 'optax-sm3[flax]'``.
"""

from optax_sm3 import _extras

with _extras.requiring(__name__, "flax", "Flax", "flax"):
  from optax_sm3._sparse._nnx import SparseEmbed, SparseState
  from optax_sm3._sparse._nnx_accumulate import MultiSteps
  from optax_sm3._sparse._nnx_check import checked_update, state_mismatch
  from optax_sm3._sparse._nnx_grad import grad, value_and_grad
  from optax_sm3._sparse._nnx_optimizer import SparseOptimizer
  from optax_sm3._sparse._types import SparseGrad

__all__ = (
  "MultiSteps",
  "SparseEmbed",
  "SparseGrad",
  "SparseOptimizer",
  "SparseState",
  "checked_update",
  "grad",
  "state_mismatch",
  "value_and_grad",
)
