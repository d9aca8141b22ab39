"""Stopping on a signal: SIGTERM (a scheduler's time limit or preemption, ``kill``) is handled like
Ctrl-C, and a second signal cannot cut the clean-up of the first short.

Inside :func:`graceful_stop` the first SIGINT or SIGTERM raises :class:`Stopped` (a
``KeyboardInterrupt``) in the main thread, so the code that handles Ctrl-C today (the run marked
``KILLED`` with its reason, a study trial marked interrupted for its retry, the last epoch's
checkpoint kept) handles both. Every later SIGINT or SIGTERM is ignored until the block ends: a
double Ctrl-C no longer interrupts the write that marks a run ``KILLED``. SIGKILL cannot be handled;
a run killed by it is found dead later (``Tracker.process_gone``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal (``signal_name``: ``SIGINT`` or ``SIGTERM``)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)


@dataclass
class StopState:
    """What :func:`graceful_stop` saw: the first stop signal, if any, and how many came after it."""

    signum: int | None = None
    ignored: int = 0
    _previous: dict[int, object] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """The shell's code for death by the first signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGINT)


def signal_name(exc: BaseException) -> str:
    """``SIGTERM`` for a :class:`Stopped` by SIGTERM, else ``SIGINT`` (a plain ``KeyboardInterrupt``)."""
    return getattr(exc, "signal_name", "SIGINT")


def exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopState]:
    """SIGINT and SIGTERM raise :class:`Stopped` once, then are ignored, until the block ends.

    Outside the main thread (signals cannot be handled there) it changes nothing."""
    state = StopState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame) -> None:
        if state.signum is not None:
            state.ignored += 1
            return
        state.signum = signum
        raise Stopped(signum)

    for signum in STOP_SIGNALS:
        state._previous[signum] = signal.signal(signum, handler)
    try:
        yield state
    finally:
        for signum, previous in state._previous.items():
            signal.signal(signum, previous)
