"""Real-data benchmarks of optax-sm3 against optax optimizers (``python -m benchmarks``)."""
