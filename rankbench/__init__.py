"""rankbench: compare rank-selection methods for tensor-decomposed neural networks."""

__version__ = "0.2.0"
