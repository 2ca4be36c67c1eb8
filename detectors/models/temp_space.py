"""Temporary space for the int8 build (``detectors.models.pixel_int8``).

The build writes the graph several times over into the temporary directory
(``tempfile.gettempdir()``: TMPDIR, else /tmp), which in a container is often a
small tmpfs. A directory without room for that is said before the build starts
(``check_temp_space``) and, when it fills up during the build, instead of what
onnx then reports (a graph that onnxruntime's optimizer wrote cut short reads
back as "Wire format was corrupt"): ``TempSpaceError``, naming the directory,
the space free and needed, and the fix (``space_said``). Apart from the
quantizer so that the int8 graph's cache key (that module's source) does not
change with these words.
"""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
import threading
from contextlib import contextmanager
from typing import Iterator

# Temporary space a build needs, in copies of the fp32 graph. Measured on a tmpfs TMPDIR with
# the packaged Lite2 graph (18.4 MiB): both build_int8 and calibrate's own pass peaked at
# 55.1-55.2 MiB, three copies at once (ours, then onnxruntime's optimizer output and the
# shape-inferred graph inside quant_pre_process); a 55 MiB tmpfs failed, 56 MiB built. The
# fourth copy is the margin (73.5 MiB for Lite2).
TEMP_COPIES = 4
MiB = 2**20
# The loggers quant_pre_process reports on; its optimizer's failure (a graph it could not write) is
# logged there with a traceback and advice to skip optimization, and the build goes on.
_PREPROCESS_LOGGERS = ("onnxruntime.quantization.shape_inference",)
# One build step at a time holds those loggers: a second one entering meanwhile would save the
# first's ``propagate = False`` as the value to put back, and leave the loggers cut off for good.
_HOLDING = threading.RLock()


class TempSpaceError(OSError):
    """The temporary directory has no room for the int8 build. An ``OSError``, not a
    ``ValueError``/``RuntimeError``: the backbone does not fall back to fp32 over it (the head
    was not trained on fp32); the model load fails, saying this."""


def temp_space_needed(fp32_size: int) -> int:
    """Bytes of temporary space an int8 build of an fp32 graph of ``fp32_size`` bytes needs."""
    return TEMP_COPIES * fp32_size


def _fix(where: str) -> str:
    return (f"raise the size of {where} (compose: its tmpfs size=; Kubernetes: its emptyDir's sizeLimit) "
            "or point TMPDIR at a writable directory with room")


def check_temp_space(fp32_size: int) -> None:
    """Raise ``TempSpaceError`` when the temporary directory has less free than a build needs."""
    where = tempfile.gettempdir()
    need, free = temp_space_needed(fp32_size), shutil.disk_usage(where).free
    if free < need:
        raise TempSpaceError(f"building the int8 pixel backbone needs about {need / MiB:.1f} MiB of temporary "
                             f"space in {where}, which has {free / MiB:.1f} MiB free: {_fix(where)}")


@contextmanager
def space_said(fp32_size: int) -> Iterator[None]:
    """A build step whose failure a lack of temporary space explains is re-raised as
    ``TempSpaceError``: ENOSPC (EDQUOT) itself, and any other failure when, once it failed
    (its files removed), the directory has less free than a build needs: a check before the
    build found enough, so the space went during it, and what onnx reported (a file cut short
    read back as "Wire format was corrupt", onnxruntime's INVALID_PROTOBUF) came of that. With
    room to spare the failure stays what it was. quant_pre_process's own report of its failed
    optimizer is held meanwhile: dropped when the step ran out of space (it was that), logged
    as it came otherwise."""
    with _HOLDING:
        yield from _held_while(fp32_size)


def _held_while(fp32_size: int) -> Iterator[None]:
    held: list[logging.LogRecord] = []
    loggers = [logging.getLogger(name) for name in _PREPROCESS_LOGGERS]
    keep = logging.Handler()
    keep.emit = held.append  # type: ignore[method-assign]
    was = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(keep)
        lg.propagate = False
    try:
        yield
    except Exception as e:
        where = tempfile.gettempdir()
        need = temp_space_needed(fp32_size)
        try:
            free: int | None = shutil.disk_usage(where).free
        except OSError:
            free = None
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if free is None or not (full or free < need):
            raise
        held.clear()
        raise TempSpaceError(f"building the int8 pixel backbone ran out of temporary space in {where} ({free / MiB:.1f} "
                             f"MiB free once its files were removed, about {need / MiB:.1f} MiB needed): "
                             f"{_fix(where)}") from e
    finally:
        for lg, p in zip(loggers, was):
            lg.removeHandler(keep)
            lg.propagate = p
        for record in held:
            logging.getLogger(record.name).handle(record)
