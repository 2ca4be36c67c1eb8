"""``deepwatch desk-users list|remove``: the desk's users as the users file
holds them (``deepwatch desk-user NAME`` creates or replaces one). Removing
a user was hand-editing ``desk-users.json``; the desk reads the file on each
request, so a removed user's open sessions end at their next request and
their password no longer logs in."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from detectors.printable import escaped
from streams.cli.app import app
from streams.cli.common import (
    Config, DataDir, FormatOpt, JsonAlias, check_format, err, fail, note_empty, print_json, settings_from, shown,
)
from streams.cli.tables import fit, keyed_table

users_app = typer.Typer(
    name="desk-users",
    help="List or remove desk users (`deepwatch desk-user NAME` creates or replaces one).",
    no_args_is_help=True,
)
app.add_typer(users_app, name="desk-users", rich_help_panel="Desk", short_help=users_app.info.help)

def _users_file(config: Optional[Path], data_dir: Optional[Path]) -> Path:
    """The users file `deepwatch desk-user` writes and the desk reads (desk.users_file, else
    <data_dir>/desk-users.json)."""
    from streams.cli.serve import _users_path

    return _users_path(settings_from(config, data_dir=data_dir))


def _users(path: Path) -> list:
    """The users file's users; a broken or unreadable file is one line naming it and the fix."""
    from streams.desk.auth import read_users

    try:
        return read_users(path)
    except ValueError as e:
        fail(f"{e}; fix or move the file, then run this again")
    except OSError as e:
        fail(f"cannot read the users file {path} ({e.strerror or e}): check its permissions")


@users_app.command("list")
def list_(data_dir: Optional[Path] = DataDir, config: Optional[Path] = Config, fmt: str = FormatOpt,
          as_json: bool = JsonAlias) -> None:
    """The desk's users and their roles (never their password hashes).

    API tokens come from the desk's environment (desk.tokens_env), not from
    the users file, and are not listed."""
    fmt = "json" if as_json else check_format(fmt)  # json: an array of {name, role}
    path = _users_file(config, data_dir)
    users = _users(path)
    if fmt == "json":
        print_json([{"name": u.name, "role": u.role} for u in users])
        return
    if not users:
        note_empty(f"no desk users in {path}: `deepwatch desk-user NAME --role viewer|editor` adds one")
        return
    table = keyed_table("name", "role")
    for u in users:
        table.add_row(shown(u.name), u.role)
    Console().print(fit(table))


@users_app.command("remove")
def remove(
    name: str = typer.Argument(..., metavar="NAME", help="The user to remove, as `deepwatch desk-users list` shows it."),
    data_dir: Optional[Path] = DataDir,
    config: Optional[Path] = Config,
) -> None:
    """Remove a desk user from the users file.

    Their password no longer logs in, and their open sessions end at their
    next request (the desk reads the file on each one)."""
    from streams.desk.auth import remove_user

    path = _users_file(config, data_dir)
    users = _users(path)
    try:
        removed = remove_user(path, name)
    except (ValueError, OSError) as e:
        fail(f"{e}; nothing was removed")
    if not removed:
        known = ", ".join(u.name for u in users) or "none"
        where = f"in {path}" if path.exists() else f"(there is no users file {path}; `deepwatch desk-user` creates it)"
        fail(f"no desk user {escaped(name)!r} {where} (users: {escaped(known)}); `deepwatch desk-users list` shows them")
    err.print(f"removed {escaped(name)} from {path}; their open sessions end at their next request",
              markup=False, highlight=False, soft_wrap=True)
