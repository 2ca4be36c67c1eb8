"""Network errors in the words an operator needs: why a connection failed,
and which option to change when an address or port to listen on cannot be
used.

HTTP clients wrap the socket error several layers deep (urllib3's
``NewConnectionError`` inside ``MaxRetryError`` inside requests'
``ConnectionError``, or elastic-transport's ``ConnectionError``), and their
messages carry object reprs such as ``<urllib3.connection.HTTPConnection
object at 0x7f...>``. An error line should say "Connection refused".
"""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl

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
        if isinstance(x, ssl.SSLError):  # an OSError whose errno is OpenSSL's code (1 read "Operation not permitted")
            return f"TLS: {x.reason or x.strerror or x}"
        if isinstance(x, OSError) and isinstance(x.errno, int) and x.errno > 0:
            # the system's words: asyncio's strerror is "Connect call failed ('127.0.0.1', 1)"
            return os.strerror(x.errno)
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
    for x in _chain(e):
        if isinstance(x, TimeoutError) or "timeout" in type(x).__name__.lower():
            return "timed out"
    text = _OBJECT_REPR.sub("", str(e)).strip() or type(e).__name__
    return text.splitlines()[0][:300]


class _OneLineOSError(OSError):
    """Made as ``(errno, message)``. An OSError, so the CLI prints it as one
    line; its text is the message alone, with the fix (no ``[Errno N]``)."""

    def __str__(self) -> str:
        return self.strerror


class PortInUse(_OneLineOSError):
    """A port this process was told to listen on is taken."""

    def __init__(self, message: str):
        super().__init__(errno.EADDRINUSE, message)


class AddressNotUsable(_OneLineOSError):
    """The address this process was told to listen on does not resolve, or is
    not one of this machine's."""


_LISTEN_HINT = "use 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or the address of one of its interfaces"


def ensure_port_free(host: str, port: int, fix: str, host_option: str = "--host") -> None:
    """Fail before a server starts, rather than let it log a bind error
    after its start-up (uvicorn's exit 3). ``fix`` names the option to change
    when the port is taken; ``host_option`` the one that gave ``host``, named
    when it cannot be listened on. Port 0 checks the address alone."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except socket.gaierror:
            raise AddressNotUsable(errno.EADDRNOTAVAIL, f"{host_option} {host} is neither an IP address nor a "
                                                        f"host name that resolves; {_LISTEN_HINT}") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} on {host} is in use by another process; {fix}") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise AddressNotUsable(errno.EADDRNOTAVAIL, f"{host_option} {host} is not an address of this "
                                                            f"machine; {_LISTEN_HINT}") from None
            raise
