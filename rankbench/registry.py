"""Deprecated since 0.2.0: rankbench 0.1.0's ``rankbench.registry``, now rankbench.plugins.registry.

Plugins import from ``rankbench.plugin``, the stable surface. This module only forwards to
rankbench.plugins.registry, with a ``DeprecationWarning``; it goes in a later minor version (see CHANGELOG.md).
"""

import warnings

from rankbench.plugins.registry import METHOD_GROUP, TASK_GROUP, Registry

warnings.warn("rankbench.registry is deprecated since rankbench 0.2.0 and will be removed: "
              "import from rankbench.plugin", DeprecationWarning, stacklevel=2)

__all__ = ['METHOD_GROUP', 'TASK_GROUP', 'Registry']
