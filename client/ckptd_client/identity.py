"""Who a run and a process are: run ids, the boot, a process's start time.

Shared by the client and the daemon (liveness, validation), which must agree
on them; stdlib only.
"""

from __future__ import annotations

import os
import re
import time

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


LEVELS = ("debug", "info", "warning", "error", "critical")


def valid_run_id(run_id: str) -> bool:
    """Run ids become directory names: no separators, no ``..``, no NUL."""
    return bool(RUN_ID_RE.fullmatch(run_id)) and ".." not in run_id


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(3).hex()


#: Recorded start times below this are seconds since boot; larger ones are
#: seconds since the epoch, as clients before wave 2 recorded them.
BOOT_RELATIVE_MAX = 1e9


def process_start_time(pid: int | None = None) -> float | None:
    """When the process started, in seconds since boot (``/proc/<pid>/stat``).

    With the boot id this names one process for good, so the daemon can tell a
    live process from a recycled pid. Not seconds since the epoch: those are
    derived from the wall clock, and an NTP step (common right after boot on a
    machine without a clock battery) moved them, so a live run looked vanished
    and auto-resume would have started it a second time.
    """
    try:
        with open(f"/proc/{pid or os.getpid()}/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat.rsplit(b")", 1)[1].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def boot_seconds() -> float:
    """Seconds since boot (``CLOCK_BOOTTIME``, counting suspend): the clock of
    :func:`process_start_time`, for a grace period that a step of the wall
    clock must not stretch or cut short (an NTP step back would stretch a
    ``time.time()`` one by the size of the step)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id() -> str:
    override = os.environ.get("CKPTD_TEST_BOOT_ID")
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"
