"""Built-in rank-selection methods, one per file (installed as ``rankbench.methods``)."""
