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
    try:
        from streams.zygote import prestart

        prestart(sys.argv[1:])
        from streams.cli import main as cli_main

        # Inside the try too: Ctrl-C can land before run_cli's own try starts.
        cli_main()
    except KeyboardInterrupt:  # Ctrl-C while the command line imports: as once it runs (streams.cli.common.run_cli)
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":  # python -m streams.console: what the script runs, for benches and checkouts
    main()
