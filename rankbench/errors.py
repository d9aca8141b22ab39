"""User-facing errors: the CLI prints their message on one line and exits 2."""


class RankbenchError(Exception):
    """An error caused by the user's input or environment, with a message naming the fix."""


class MissingRecord(RankbenchError):
    """What was asked for (a run, a metric, an artifact) is not in the tracking store."""
