"""The ``deepwatch`` command line. Each command group lives in its own module
and registers itself on the shared Typer ``app``."""

from __future__ import annotations

from streams.cli.app import app
from streams.cli import pipeline, query, detect, bank, models  # noqa: F401,E402  (registration)
from streams.cli import connect  # noqa: F401,E402  (registration)
from streams.cli import grafana  # noqa: F401,E402  (registration)
from streams.cli import serve  # noqa: F401,E402  (registration)
from streams.cli import settings_cmd  # noqa: F401,E402  (registration)
from streams.cli import redeliver  # noqa: F401,E402  (registration)


def main() -> None:
    from streams.cli.common import run_cli

    run_cli(app)
