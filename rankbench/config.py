"""Deprecated since 0.2.0: rankbench 0.1.0's ``rankbench.config``, now split.

Plugins import from ``rankbench.plugin``, the stable surface. This module only forwards to
rankbench.hyper (Hyper, Search, parse_assignments, resolve) and rankbench.run.config (RunConfig,
parse_budget), with a ``DeprecationWarning``; it goes in a later minor version (see CHANGELOG.md).
"""

import warnings

from rankbench.hyper import Hyper, Search, parse_assignments, resolve
from rankbench.run.config import RunConfig, parse_budget

warnings.warn("rankbench.config is deprecated since rankbench 0.2.0 and will be removed: import from rankbench.plugin",
              DeprecationWarning, stacklevel=2)

__all__ = ['Hyper', 'Search', 'parse_assignments', 'resolve', 'RunConfig', 'parse_budget']
