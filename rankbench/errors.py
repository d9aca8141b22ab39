"""User-facing errors: the CLI prints their message on one line and exits 2."""


class RankbenchError(Exception):
    """An error caused by the user's input or environment, with a message naming the fix.

    Raise it from plugin code for missing or bad data, a bad setting, an unusable
    environment: the command line prints ``rankbench: error: <message>`` on one line and
    exits 2 (any other exception is a bug: one line, exit 1). Name the fix in the
    message, as in ``raise RankbenchError(f"{folder}: no data files: pass --data-dir or --download")``.
    """


class MissingRecord(RankbenchError):
    """What was asked for (a run, a metric, an artifact) is not in the tracking store."""
