"""Row-sparse SM3 for embedding tables: one home for the sparse code.

The modules, lowest layer first (each imports only modules above it):

* ``_types``: :class:`SparseGrad`, a table's gradient as looked-up rows.
* ``_ids``: checking row ids, and reading a table's rows by them.
* ``_batch``: a table's gradient as its distinct rows, and SM3 (any cover,
  SM3-I or -II) on them, exactly the dense step.
* ``_table_rule``: a table's rule, derived from the spec of an optimizer
  made by :func:`optax_sm3.sm3` (its options resolved per table, the sweep
  period, the cover, the clipping; stages with no row-sparse form refused).
* ``_row_step``: the row-sparse step of a table by its rule (the
  optimizer's stages on the batch's rows; rows outside the batch caught up
  lazily with momentum or weight decay).
* ``_rows``: :func:`sparse_rows`, one table, and each table's jitted
  functions.
* ``_capture``: lookups captured as row gradients under any JAX transform.
* ``_grad``: :func:`sparse_lookup` and :func:`sparse_value_and_grad`.
* ``_table_layout``: how a ``sparse_tables`` state shards relative to the
  parameters (its layout rule).
* ``_tables``: :func:`sparse_tables` (the tables of a params tree, ``tx``
  for the rest) and ``step_tables``, the tables' steps from sparse or dense
  gradients, clipped jointly.
* ``_accumulate``: sums and means of sparse gradients, and
  :func:`sparse_multi_steps`.
* ``_embed``: what the Flax embedding modules share.
* Framework layers, imported only by their namespaces: ``_nnx``
  (``SparseEmbed``), ``_nnx_grad``, ``_nnx_optimizer``, ``_nnx_state``,
  ``_nnx_accumulate``, ``_nnx_check`` (``optax_sm3.nnx``); ``_linen``
  (``optax_sm3.linen``); ``_equinox`` (``optax_sm3.equinox``).
"""
