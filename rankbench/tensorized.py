"""Deprecated since 0.2.0: rankbench 0.1.0's ``rankbench.tensorized``, now rankbench.layers.tensorized.

Plugins import from ``rankbench.plugin``, the stable surface. This module only forwards to
rankbench.layers.tensorized, with a ``DeprecationWarning``; it goes in a later minor version (see CHANGELOG.md).
"""

import warnings

from rankbench.layers.tensorized import *  # noqa: F403

warnings.warn("rankbench.tensorized is deprecated since rankbench 0.2.0 and will be removed: "
              "import from rankbench.plugin", DeprecationWarning, stacklevel=2)
