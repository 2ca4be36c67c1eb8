"""CPU priority of a whole process, thread by thread."""

from __future__ import annotations

import os


def renice_threads(pid: int, nice: int) -> int:
    """Set every thread of ``pid`` to ``nice``: Linux niceness is per thread,
    and a thread inherits its creator's, so the threads a process already
    started are reniced one by one. Raising priority needs CAP_SYS_NICE;
    without it nothing changes. Returns the threads changed."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    changed = 0
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            changed += 1
        except OSError:  # EPERM without the capability, ESRCH for a thread that just ended
            pass
    return changed
