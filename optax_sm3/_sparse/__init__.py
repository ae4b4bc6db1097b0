"""Row-sparse SM3 for embedding tables: one home for the sparse code.

The layers, lowest first (each module imports only those above it):

* ``_types``: :class:`SparseGrad`, a table's gradient as looked-up rows.
* ``_rows``: :func:`sparse_rows`, exact SM3 on one table's batch rows.
* ``_capture``: capturing lookups as row gradients under any JAX transform.
* ``_grad``: :func:`sparse_lookup` and :func:`sparse_value_and_grad`.
* ``_tables``: :func:`sparse_tables`, a params tree's tables and the rest.
* ``_accumulate``: sums and means of sparse gradients, and
  :func:`sparse_multi_steps`.
* Framework layers, imported only by their namespaces (``optax_sm3.nnx``,
  ``optax_sm3.linen``, ``optax_sm3.equinox``): ``_nnx*``, ``_linen``,
  ``_equinox``.
"""
