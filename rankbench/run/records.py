"""Where the recorded names lived before they became a leaf module (``rankbench.records``): an alias
for the code that still imports them from here."""

from rankbench.records import *  # noqa: F403
from rankbench.records import Direction, Kind, Record, metric  # noqa: F401
