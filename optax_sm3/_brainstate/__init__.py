"""The braintools-style optimizer object; its public face is ``optax_sm3.brainstate``."""
