"""Ctrl-C and SIGTERM held back from code that must not stop half way.

Python raises a signal's exception between any two bytecodes of the main
thread. Inside a library call that leaves its state half written: a Ctrl-C
landing inside kafka-python's ``KafkaProducer.send`` can fall between the
batch builder counting a record and writing its bytes, and the batch then
sent on close carries a record count its bytes do not hold (seen in CI: the
embedded broker stored it and every reader of that partition failed with
``CorruptRecordError``; a real Kafka refuses the batch and the records
already in it with it). Inside ``subprocess.Popen`` it leaves a child nobody
knows of.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class HeldSignals:
    """While entered, the signals are noted, not raised; ``deliver()`` (and
    leaving) hands a noted one to the handler that was there before, so it
    unwinds as it would have (Python's default SIGINT handler raises
    ``KeyboardInterrupt``; the CLI's SIGTERM handler raises ``Terminated``).

    Noting handlers rather than a blocked or ignored signal: a child process
    inherits the signal mask and ignored signals, and must stay stoppable.
    Handlers exist only on the main thread: elsewhere this holds nothing,
    and a signal is not raised there anyway."""

    def __init__(self, signums: tuple[int, ...] = STOP_SIGNALS):
        self._signums = signums
        self._previous: dict[int, Any] = {}
        self.noted: list[int] = []

    def __enter__(self) -> "HeldSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self._signums:
                previous = signal.signal(signum, self._note)
                # None: a handler not set from Python, which cannot be set back
                self._previous[signum] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc: object) -> None:
        self.deliver()
        self._restore()

    def _note(self, signum: int, frame: Any) -> None:
        self.noted.append(signum)

    def _restore(self) -> dict[int, Any]:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        return previous

    def deliver(self) -> None:
        """Raise a signal noted so far, as the handler before would have.
        Handlers go back first: a second Ctrl-C while it unwinds acts at once."""
        if not self.noted:
            return
        signum = self.noted[0]
        self.noted.clear()
        handler = self._restore().get(signum)
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), signum)
