"""``deepwatch serve``: the fact-check desk (web app + REST API), and
``deepwatch desk-user`` to create its users."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Callable, Optional

import typer

from detectors.printable import escaped
from streams.cli.app import app
from streams.cli.common import (
    Config, DataDir, check_alert_senders, check_banks, check_store_option, check_writable_dir, err, fail, say,
    settings_from,
)
from streams.http_deadlines import head_deadline_protocol

DESK_CONNECTIONS = 600


@app.command(rich_help_panel="Desk")
def serve(
    data_dir: Optional[Path] = DataDir,
    store: Optional[str] = typer.Option(None, "--store", callback=check_store_option, help="Findings store: sqlite:///PATH or es://HOST:9200 / https://HOST:9200 (default: findings.sqlite in --data-dir)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Reading is open on loopback; any other address requires a login."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="Port to listen on."),
    config: Optional[Path] = Config,
    broker: Optional[str] = typer.Option(None, "--broker", help="kafka://HOST:PORT: also publish desk alerts on the alerts topic."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", min=0, max=65535, help="Serve Prometheus /metrics (requests by route, verdicts, logins) on this port, apart from the desk's (env DEEPWATCH_METRICS_PORT)."),
) -> None:
    """Start the fact-check desk: the queue, clusters, verdicts, accounts and search, with a REST API (/docs).

    Verdicts need an editor: a user from the users file (`deepwatch desk-user`)
    or a token in DEEPWATCH_DESK_TOKENS (role:name:token,...). There are no
    default credentials.
    """
    import uvicorn

    from streams.desk import create_app

    from streams.net_errors import ensure_port_free

    from streams import logs

    settings = settings_from(config, data_dir=data_dir, broker=broker, metrics_port=metrics_port)
    # desk.sqlite, the thumbnail cache and the banks live there: a read-only
    # directory started the desk, and its first verdict was a 500
    check_writable_dir(settings.data_dir, "--data-dir")
    check_banks(settings)  # the desk records verdicts into them
    check_alert_senders(settings)  # the desk's account alerts go to the webhooks too
    if settings.broker != "embedded":  # checked now, not at the first desk alert it could not publish
        from streams.broker import BrokerError, bootstrap_of

        try:
            bootstrap_of(settings.broker)
        except BrokerError as e:
            raise typer.BadParameter(f"{e} (the desk publishes its alerts there)", param_hint="--broker") from None
    # The metrics server would take the port first and the desk fail to bind it
    # after its start-up; 0 on both is two free ports, no clash.
    if settings.metrics_port == port and port != 0:
        fail(f"--metrics-port {port} is --port too; give metrics a port of their own")
    ensure_port_free(host, port, "pick another --port")
    _users_path(settings)
    try:
        desk_app = create_app(settings, host=host, store_url=store)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    # As the workers and serve-ingest log (after the start-up checks, whose
    # mistakes are one line): the desk's errors were Python's bare
    # last-resort lines, multi-line tracebacks in a JSON log shipper's stream.
    logs.setup(settings.log_level, settings.log_format)
    shown_host = f"[{host}]" if ":" in host else host
    fmt = settings.log_format
    more: list[Callable[[], None]] = []
    if settings.metrics_port is not None:
        from streams import metrics

        # on the desk's address: a desk kept to loopback keeps its counters there too;
        # a port in use ends the command here, before the desk says it is on
        shown = metrics.serve(settings.metrics_port, host=host)
        url = f"http://{shown_host}:{shown}/metrics"
        more.append(lambda: say(f"metrics on {url}", fmt=fmt, msg="metrics listening", style="dim", url=url, port=shown))
    proxies = settings.desk.trusted_proxies
    plain = plain_http_warning(host, settings)
    if plain:
        say(plain, fmt=fmt, level="warning", msg="desk served over plain http off loopback", style="yellow")
    # Slow or piled-up clients: a request head must arrive within 10 s, and at
    # most DESK_CONNECTIONS are held open (well under a default 1,024 descriptors).
    config = uvicorn.Config(desk_app, host=host, port=port, log_level="warning", log_config=None, server_header=False,
                            proxy_headers=bool(proxies), forwarded_allow_ips=",".join(proxies) or None,
                            timeout_keep_alive=5, http=head_deadline_protocol(max_connections=DESK_CONNECTIONS))

    def desk_on(bound: int) -> None:
        url = f"http://{shown_host}:{bound}/"
        say(f"desk on {url} (API docs at /docs); data in {settings.data_dir}", fmt=fmt, msg="desk listening",
            style="dim", url=url, port=bound, docs=url + "docs", data_dir=str(settings.data_dir))

    _run_desk(config, desk_on, more)


def plain_http_warning(host: str, settings) -> str | None:
    """What to say at start when browsers cannot log in to the desk: bound
    off loopback its login cookies are Secure, which browsers keep only over
    https, and the desk speaks plain http; with no TLS-terminating proxy
    configured (``desk.trusted_proxies``) nor an https ``desk.public_url``,
    none is in front of it. None when there is nothing to say."""
    from detectors.netaddr import is_loopback
    from streams.desk.app import tls_configured

    if is_loopback(host) or tls_configured(settings.desk):
        return None
    return (f"the desk listens on {host} over plain http: off loopback its login cookies are Secure, which browsers "
            "keep only over https, so a browser reaching it at a non-loopback address cannot log in (bearer tokens "
            "still work, in clear text). Put a TLS-terminating reverse proxy in front, list it in desk.trusted_proxies "
            "(DEEPWATCH_DESK__TRUSTED_PROXIES) and set desk.public_url to its https address; or bind --host 127.0.0.1")


def _run_desk(config, desk_on: Callable[[int], None], more: list[Callable[[], None]]) -> None:
    """``uvicorn.run``, calling ``desk_on(port it listens on)`` and then each
    of ``more`` (the lines that say so) once the desk listens: "desk on ..."
    came before either port was bound, and stood above the error line when
    the metrics port was taken."""
    import sys

    import uvicorn

    class DeskServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                bound = [s.getsockname()[1] for server in self.servers for s in (server.sockets or ())]
                desk_on(bound[0] if bound else config.port)
                for line in more:
                    line()

    server = DeskServer(config)
    try:
        server.run()
    except KeyboardInterrupt:  # as uvicorn.run: Ctrl-C is the way to stop the desk
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's start-up failure (it logged why)


def _users_path(settings) -> Path:
    """The desk's users file, refused when it names a directory (a bare
    ``[Errno 21] Is a directory`` from serve and desk-user)."""
    path = settings.desk.users_file or Path(settings.data_dir) / "desk-users.json"
    if path.is_dir():
        if settings.desk.users_file:
            fail(f"desk.users_file {path} is a directory: name a JSON file, e.g. {path / 'desk-users.json'} "
                 "([desk] users_file or DEEPWATCH_DESK__USERS_FILE)")
        fail(f"{path} is a directory: move it aside, or set desk.users_file to a JSON file")
    return path


@app.command("desk-user", rich_help_panel="Desk")
def desk_user(
    name: str = typer.Argument(..., metavar="NAME", help="User name (letters, digits, . _ @ -)."),
    role: str = typer.Option("viewer", "--role", help="viewer (reads) or editor (reads and records verdicts)."),
    data_dir: Optional[Path] = DataDir,
    config: Optional[Path] = Config,
    password_env: Optional[str] = typer.Option(None, "--password-env", help="Read the password from this environment variable instead of a prompt."),
) -> None:
    """Create or replace a desk user in the users file (scrypt-hashed password)."""
    from pydantic import ValidationError

    from streams.desk.auth import UserEntry, add_user
    from streams.settings_check import SECRET_SUFFIXES

    if role not in ("viewer", "editor"):
        raise typer.BadParameter("must be viewer or editor", param_hint="--role")
    try:  # the name is checked before the password is asked for, not after it was typed twice
        UserEntry(name=name, role=role, password="")
    except ValidationError:
        # pydantic's own words leaked its regex ("String should match pattern '^[A-Za-z0-9_.@-]+$'")
        raise typer.BadParameter(f"'{escaped(name)}' is not a user name: use 1-64 letters, digits, . _ @ -, "
                                 "e.g. erin or erin.doe@desk", param_hint="NAME") from None
    if password_env and password_env.upper().startswith("DEEPWATCH_") and not password_env.upper().endswith(SECRET_SUFFIXES):
        # The settings loader reads DEEPWATCH_* as settings and refuses unknown ones.
        raise typer.BadParameter(f"{password_env} would be read as a setting: end the name in {', '.join(SECRET_SUFFIXES)} "
                                 "(e.g. DEEPWATCH_DESK_PASSWORD), or drop the DEEPWATCH_ prefix", param_hint="--password-env")
    settings = settings_from(config, data_dir=data_dir)
    _users_path(settings)  # before the password is typed
    if password_env:
        password = os.environ.get(password_env, "")
        if not password:
            raise typer.BadParameter(f"environment variable {password_env} is empty or unset", param_hint="--password-env")
    else:
        import sys

        no_prompt = typer.BadParameter("no password was typed; run it in a terminal, or put the password in an "
                                       "environment variable and pass --password-env NAME", param_hint="password")
        if not sys.stdin.isatty():  # getpass would print GetPassWarning lines before failing
            raise no_prompt
        try:
            password = getpass.getpass(f"password for {name}: ")
            again = getpass.getpass("again: ")
        except EOFError:  # Ctrl-D at the prompt
            raise no_prompt from None
        if password != again:
            raise typer.BadParameter("the two passwords differ")
    if len(password) < 10:
        raise typer.BadParameter("use at least 10 characters", param_hint="password")
    path = _users_path(settings)
    try:
        add_user(path, name, role, password)
    except ValidationError as e:
        raise typer.BadParameter(e.errors()[0]["msg"], param_hint="NAME") from None
    except ValueError as e:  # the users file is broken; add_user left it as it was
        fail(f"{e}; fix or move the file, then run this again")
    err.print(f"{name} ({role}) saved in {path}")
