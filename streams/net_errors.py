"""Network errors in the words an operator needs: why a connection failed,
and which port to change when one to listen on is taken.

HTTP clients wrap the socket error several layers deep (urllib3's
``NewConnectionError`` inside ``MaxRetryError`` inside requests'
``ConnectionError``, or elastic-transport's ``ConnectionError``), and their
messages carry object reprs such as ``<urllib3.connection.HTTPConnection
object at 0x7f...>``. An error line should say "Connection refused".
"""

from __future__ import annotations

import errno
import re
import socket

_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>:?\s*")


def _chain(e: BaseException):
    """``e`` and every exception it wraps: causes, contexts, and exceptions
    passed as arguments (urllib3 keeps its reason there)."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [c for c in (x.__cause__, x.__context__, getattr(x, "reason", None), *getattr(x, "args", ()))
                 if isinstance(c, BaseException)]


def network_reason(e: BaseException) -> str:
    """The innermost operating-system reason (``Connection refused``, ``Name
    or service not known``), else the client's message without object reprs."""
    for x in _chain(e):
        if isinstance(x, socket.gaierror) or "nameresolution" in type(x).__name__.lower():
            return "the host name does not resolve"
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
    for x in _chain(e):
        if isinstance(x, TimeoutError) or "timeout" in type(x).__name__.lower():
            return "timed out"
    text = _OBJECT_REPR.sub("", str(e)).strip() or type(e).__name__
    return text.splitlines()[0][:300]


class PortInUse(OSError):
    """A port this process was told to listen on is taken. An OSError, so the
    CLI prints it as one line; its text is the message alone, with the fix."""

    def __init__(self, message: str):
        super().__init__(errno.EADDRINUSE, message)

    def __str__(self) -> str:
        return self.strerror


def ensure_port_free(host: str, port: int, fix: str) -> None:
    """Fail before a server starts, rather than let it log a bind error
    after its start-up (uvicorn's exit 3). ``fix`` names the option to change."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} on {host} is in use by another process; {fix}") from None
            raise
