"""brainstate integration: :class:`SM3`, a drop-in for ``braintools.optim.SM3``.

``SM3`` takes the ``braintools.optim`` optimizer interface (register a tree
of ``brainstate.State`` objects, ``step(grads)``, learning-rate schedulers,
parameter groups, ``state_dict``) over :func:`optax_sm3.sm3`. It needs
brainstate only for trees of States: without it, it trains a plain pytree of
arrays, so importing this module imports neither brainstate nor braintools
(``pip install 'optax-sm3[brainstate]'`` for them). ``optax_sm3.SM3`` is
the same class.
"""

from optax_sm3._brainstate._optimizer import SM3
from optax_sm3._brainstate._rates import ConstantLR

__all__ = ("SM3", "ConstantLR")
