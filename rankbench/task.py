"""Deprecated since 0.2.0: rankbench 0.1.0's ``rankbench.task``, now rankbench.plugins.task.

Plugins import from ``rankbench.plugin``, the stable surface. This module only forwards to
rankbench.plugins.task, with a ``DeprecationWarning``; it goes in a later minor version (see CHANGELOG.md).
"""

import warnings

from rankbench.plugins.task import Task

warnings.warn("rankbench.task is deprecated since rankbench 0.2.0 and will be removed: import from rankbench.plugin",
              DeprecationWarning, stacklevel=2)

__all__ = ['Task']
