"""Who a run and a process are: run ids, the boot, a process's start time.

Shared by the client and the daemon (liveness, validation), which must agree
on them; stdlib only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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


#: Seen once, kept: a machine that began shutting down never stops doing so,
#: and late in the shutdown ``systemctl`` may no longer get an answer (a
#: non-root user's reaches PID 1 through D-Bus, which stops before the end).
_stopping = False


def systemd_booted() -> bool:
    """Whether systemd is init here (``sd_booted()``: it creates this directory)."""
    return os.path.isdir("/run/systemd/system")


def system_stopping() -> bool:
    """True while systemd is shutting the machine down (``systemctl reboot``,
    ``poweroff``, a kernel update). Without systemd as init, False.

    Two callers: the supervisor (the SIGTERM a run gets then is not a
    person's stop, so auto-resume stays on) and autostart (a daemon started
    then is started after systemd's one SIGTERM to the unit or scope it lands
    in, so nothing ever asks it to stop: systemd waits out
    ``DefaultTimeoutStopSec`` (90 s) for it and the reboot hangs; tests/boot).
    """
    global _stopping
    if _stopping:
        return True
    systemctl = shutil.which("systemctl")
    if systemctl is None or not systemd_booted():
        return False
    try:
        out = subprocess.run([systemctl, "is-system-running"], capture_output=True,
                             text=True, timeout=3, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    _stopping = out.strip() == "stopping"
    return _stopping
