"""Why a connection failed, in the words an operator needs.

HTTP clients wrap the socket error several layers deep (urllib3's
``NewConnectionError`` inside ``MaxRetryError`` inside requests'
``ConnectionError``, or elastic-transport's ``ConnectionError``), and their
messages carry object reprs such as ``<urllib3.connection.HTTPConnection
object at 0x7f...>``. An error line should say "Connection refused".
"""

from __future__ import annotations

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
