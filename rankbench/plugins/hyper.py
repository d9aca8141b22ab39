"""Where ``Hyper`` lived before it became a leaf module (``rankbench.hyper``): an alias for the code
that still imports it from here."""

from rankbench.hyper import Hyper, Search, parse_assignments, resolve

__all__ = ["Hyper", "Search", "parse_assignments", "resolve"]
