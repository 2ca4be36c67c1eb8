"""The ``deepwatch`` console script.

Kept apart from ``streams.cli`` (whose package imports every command, about
half a second) so that a command which forks local workers can start their
zygote first and let it import beside the command line (``streams.zygote.prestart``).
"""

from __future__ import annotations

import faulthandler
import signal
import sys


def main() -> None:
    # SIGUSR1 prints every thread's stack to stderr: what a command that does
    # not end is waiting on (a replay outliving a Ctrl-C at start-up was seen
    # twice in many hundred tries, and its stack is what was missing).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGINT, _on_interrupt)
    try:
        from streams.zygote import prestart

        prestart(sys.argv[1:])
        from streams.cli import main as cli_main

        # Inside the try too: Ctrl-C can land before run_cli's own try starts.
        cli_main()
    except BaseException as e:  # Ctrl-C while the command line imports: as once it runs (streams.cli.common.run_cli)
        if isinstance(e, SystemExit) or interruption(e) is None:
            raise
        sys.stderr.write("interrupted\n")
        sys.exit(130)


# The stop signal this process has received (Ctrl-C or SIGTERM), if any.
_received: KeyboardInterrupt | None = None


def received(stop: KeyboardInterrupt) -> KeyboardInterrupt:
    """Remember that this process was told to stop (see ``interruption``) and
    return ``stop`` for the signal handler to raise."""
    global _received
    _received = stop
    return stop


def _on_interrupt(signum: int, frame: object) -> None:
    raise received(KeyboardInterrupt())


def interruption(e: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM, as ``streams.cli.common.Terminated``) behind
    ``e``, if any. Python and native extensions wrap a KeyboardInterrupt
    raised inside their hooks, so what arrives is often not the interrupt
    itself: one landing in a dataclass field's ``__set_name__`` while an
    import builds a class gives ``RuntimeError: Error calling __set_name__``
    with the interrupt as its cause (Python 3.11), and one landing while
    pydantic-core builds a model's serializer gives a ``SchemaError`` whose
    text names it but which links to nothing (CI, Ctrl-C 0.2 s into
    ``replay``). So a failure whose text names the stop this process
    received is that stop too; any other failure is its own, whatever came
    before it."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        if _received is not None and type(_received).__name__ in str(e):
            return _received
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":  # python -m streams.console: what the script runs, for benches and checkouts
    main()
