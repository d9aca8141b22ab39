"""Built-in tasks, one per file (installed as ``rankbench.tasks``)."""
