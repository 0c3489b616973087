"""Deciding that a run's process is gone, so no run stays ``running`` forever.

A run is alive while a connection of its current attempt is open, or its
supervisor (``ckptd run``) lives, or its training process lives: same pid,
same start time (a recycled pid is not the same process), same boot.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import psutil
from ckptd_client.identity import BOOT_RELATIVE_MAX, boot_id, process_start_time

if TYPE_CHECKING:
    from ckptd.daemon.server import Daemon
    from ckptd.store.writer import Store

log = logging.getLogger("ckptd.liveness")



def process_alive(pid: int | None, started: float | None) -> bool:
    """True if ``pid`` runs and is the process that started at ``started``."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is None:
            return True
        if started < BOOT_RELATIVE_MAX:  # seconds since boot: immune to clock steps
            now = process_start_time(pid)
            return now is not None and abs(now - started) < 0.05
        return abs(proc.create_time() - started) < 1.0  # an older client's epoch time
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return False


def verdict(run: dict[str, Any], connected: set[tuple[str, int]], current_boot: str) -> str | None:
    """Why the run is gone, or None while it may still be alive."""
    if run.get("boot_id") and run["boot_id"] != current_boot:
        return "the machine rebooted (boot id changed) while it ran"
    if (run["id"], run["attempt"]) in connected:
        return None
    if run.get("supervisor_pid") and process_alive(run["supervisor_pid"],
                                                   run.get("supervisor_started")):
        return None
    if run.get("pid") is None:
        if run.get("supervisor_pid"):
            return (f"supervisor {run['supervisor_pid']} vanished before its process "
                    "registered")
        return None  # not registered by a process yet
    if process_alive(run["pid"], run.get("pid_started")):
        return None
    return f"process {run['pid']} vanished without finishing (killed, OOM or crash)"


#: Added to the reason of an orphaned run that vanished (see :func:`sweep`).
ORPHAN_STOP = ("; its supervisor (`ckptd run`) had been killed before, so ckptd cannot tell "
               "a person's stop from a crash: not relaunched automatically (`ckptd resume` "
               "continues it)")


def sweep(daemon: Daemon) -> list[dict[str, Any]]:
    """Mark every run whose process is gone ``interrupted``; return those rows.

    A user's stop must stick. While ``ckptd run`` lives it sees how the
    command ended and says whether that was a stop
    (:func:`ckptd.supervise.exit_status`). Once it has been killed, nobody
    sees the exit status: a command that then vanishes without reporting
    (SIGTERM, SIGKILL; a Python trainer reports Ctrl-C itself) was most
    likely killed by the person who killed its supervisor, so auto-resume
    is switched off for it. A reboot is the exception: it is told by the
    boot id, and relaunched.
    """
    connected = daemon.connected_runs()
    current_boot = boot_id()

    def work(store: Store) -> list[dict[str, Any]]:
        marked = []
        now = time.time()
        for run in store.running_runs():
            reason = verdict(run, connected, current_boot)
            if reason is None:
                continue
            extra = {}
            orphan = run.get("supervisor_pid") and run.get("pid") and \
                run.get("boot_id") in (None, current_boot)
            if orphan and run.get("auto_resume"):
                reason += ORPHAN_STOP
                extra["auto_resume"] = 0
            store.mark_run(run["id"], run["attempt"], status="interrupted", ended=now,
                           reason=reason, **extra)
            log.info("run %s attempt %d interrupted: %s", run["id"], run["attempt"], reason)
            marked.append(dict(run, status="interrupted", reason=reason))
        return marked

    return daemon.call_writer(work)
