from __future__ import annotations

import typer

app = typer.Typer(
    name="deepwatch",
    help=(
        "Streaming monitor for AI-generated and manipulated news images.\n\n"
        "Quick start: `deepwatch demo` starts an embedded Kafka-compatible broker and a "
        "worker, replays a bundled feed and shows clusters as they form. "
        "`deepwatch replay FEED.jsonl --data-dir DIR` runs the same pipeline over your feed; "
        "`deepwatch clusters|alerts|dead-letters --data-dir DIR` query the findings afterwards."
    ),
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    """``deepwatch --version``: what a bug report and a deploy check ask
    first (it was "No such option: --version")."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("deepwatch")
    except PackageNotFoundError:  # run from a checkout that was never installed
        number = "unknown (not installed: run `make install`)"
    typer.echo(f"deepwatch {number}")
    raise typer.Exit(0)


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                      help="Print deepwatch's version and exit."),
) -> None:
    pass
