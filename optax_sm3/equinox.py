"""Equinox integration: embeddings trained one looked-up row at a time.

``SparseEmbedding`` is a drop-in for ``eqx.nn.Embedding``;
:func:`filter_value_and_grad` is ``eqx.filter_value_and_grad`` with each
SparseEmbedding's ``weight`` gradient as a :class:`SparseGrad`
``(indices, row_grads)`` (no table-sized array); :class:`SparseOptimizer`
steps the tables with exact row-sparse SM3 (:func:`optax_sm3.sparse_rows`)
and the other leaves with any optax transformation, returning the new model.
Needs Equinox: ``pip install 'optax-sm3[equinox]'``.
"""

from optax_sm3 import _extras

with _extras.requiring(__name__, "equinox", "Equinox", "equinox"):
  from optax_sm3._sparse._equinox import (
    SparseEmbedding,
    SparseOptimizer,
    filter_value_and_grad,
    table_mask,
  )
  from optax_sm3._sparse._tables import SparseTablesState
  from optax_sm3._sparse._types import SparseGrad

__all__ = (
  "SparseEmbedding",
  "SparseGrad",
  "SparseOptimizer",
  "SparseTablesState",
  "filter_value_and_grad",
  "table_mask",
)
