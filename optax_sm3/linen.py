"""Flax linen integration: ``SparseEmbed`` and the function-level helpers.

``SparseEmbed`` is a drop-in for ``nn.Embed``. Train it with
:class:`SparseTrainState` (Flax's ``TrainState`` idiom over
:func:`sparse_tables`), or with :func:`value_and_grad` (row-sparse gradients
of a loss written against the usual params tree) and :func:`sparse_tables`
(exact SM3 rows for the tables, any optax transformation for the rest, in
one jittable ``step``). Needs Flax: ``pip install 'optax-sm3[flax]'``.
"""

from optax_sm3 import _extras

with _extras.requiring(__name__, "flax", "Flax", "flax"):
  from optax_sm3._sparse._grad import sparse_lookup
  from optax_sm3._sparse._grad import sparse_value_and_grad as value_and_grad
  from optax_sm3._sparse._linen import SparseEmbed, SparseTrainState
  from optax_sm3._sparse._tables import SparseTables, SparseTablesState, sparse_tables
  from optax_sm3._sparse._types import SparseGrad

__all__ = (
  "SparseEmbed",
  "SparseGrad",
  "SparseTables",
  "SparseTablesState",
  "SparseTrainState",
  "sparse_lookup",
  "sparse_tables",
  "value_and_grad",
)
