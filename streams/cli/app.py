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
