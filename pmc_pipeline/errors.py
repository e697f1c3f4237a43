"""User-facing errors and interrupts: the CLI prints these as one line, without a traceback."""

from __future__ import annotations

import signal
import threading
from types import FrameType


def first_line(exc: BaseException) -> str:
    """The first line of an exception's root cause (libraries wrap the useful one), or its type's name."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PMCError(Exception):
    """A problem the user can fix: bad input, a missing file, an invalid setting."""


class ConfigError(PMCError):
    """A config file or override is wrong; the message names the key."""


class DataError(PMCError):
    """A data file or split is missing, unreadable, or lacks a needed field."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the driver: the job stops its actors at once and says where to resume.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number

    def where(self, suffix: str) -> "Interrupted":
        """The same interrupt, its message extended by `suffix` (e.g. " in epoch 3")."""
        return Interrupted(f"{self}{suffix}", self.signal_number)


def _raise_interrupted(signal_number: int, frame: FrameType | None) -> None:
    raise Interrupted(f"interrupted by {signal.Signals(signal_number).name}", signal_number)


def raise_on_stop_signals() -> None:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread (Python's default kills on SIGTERM
    without cleaning up; `ray.init` installs a `sys.exit` handler, so call this after it too)."""
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, _raise_interrupted)
