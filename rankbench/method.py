"""Deprecated since 0.2.0: rankbench 0.1.0's ``rankbench.method``, now rankbench.plugins.method.

Plugins import from ``rankbench.plugin``, the stable surface. This module only forwards to
rankbench.plugins.method, with a ``DeprecationWarning``; it goes in a later minor version (see CHANGELOG.md).
"""

import warnings

from rankbench.plugins.method import SELECTOR_HYPERPARAMETERS, Method, MethodContext, StepLoss

warnings.warn("rankbench.method is deprecated since rankbench 0.2.0 and will be removed: import from rankbench.plugin",
              DeprecationWarning, stacklevel=2)

__all__ = ['SELECTOR_HYPERPARAMETERS', 'Method', 'MethodContext', 'StepLoss']
