"""fraudlib: the helper package behind the fraud-model lifecycle notebooks."""

__version__ = "0.1.0"
