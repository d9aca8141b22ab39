"""The plugin layer: the method and task interfaces, declared hyperparameters, discovery
(registry) and the contract suite. Plugin authors import from ``rankbench.plugin``."""
