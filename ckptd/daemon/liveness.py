"""Deciding that a run's process is gone, so no run stays ``running`` forever.

A run is alive while a connection of its current attempt is open, or its
supervisor (``ckptd run``) lives, or its training process lives: same pid,
same start time (a recycled pid is not the same process), same boot.
"""

from __future__ import annotations

import logging
import socket
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


#: Seconds between two writes of a live rank's ``last_seen`` (each is a commit).
RANK_SEEN_EVERY_S = 10.0


def track_ranks(daemon: Daemon) -> int:
    """Record which ranks of distributed runs have a live process on this node.

    A rank is seen alive while its client's connection is open, or its process
    (pid and start time) still runs; the first sweep that finds neither records
    when it ended, so ``ckptd show`` tells "rank 3 dead since 12:04" from a
    slow rank. Only runs with ``world_size`` > 1 are tracked. Returns the rows
    written.
    """
    if daemon.stop.is_set():
        return 0
    from ckptd_client.distributed import is_client_src, rank_of_src

    with daemon.conns_lock:
        conns = [(c.run, c.attempt, rank_of_src(c.src), c.pid) for c in daemon.conns
                 if c.run and not c.closed and is_client_src(c.src)]
    host = socket.gethostname()

    def work(store: Store) -> int:
        now = time.time()
        distributed = {r["id"] for r in store.running_runs() if (r.get("world_size") or 1) > 1}
        known = {(r["run_id"], r["attempt"], r["rank"]): r
                 for r in store.rank_processes(open_only=True)}
        written, connected = 0, set()
        for run_id, attempt, rank, pid in conns:
            if run_id not in distributed:
                continue
            key = (run_id, attempt, rank)
            connected.add(key)
            row = known.get(key)
            if row is None or row["pid"] != pid or now - (row["last_seen"] or 0) >= \
                    RANK_SEEN_EVERY_S:
                started = row["pid_started"] if row is not None and row["pid"] == pid \
                    else process_start_time(pid)
                store.see_rank(run_id, attempt, rank, host, pid, started, now)
                written += 1
        for key, row in known.items():
            if key in connected or row["host"] != host:
                continue  # another node's daemon watches its own ranks
            if process_alive(row["pid"], row["pid_started"]):
                if now - (row["last_seen"] or 0) >= RANK_SEEN_EVERY_S:
                    store.mark_rank(*key, last_seen=now)
                    written += 1
            else:
                store.mark_rank(*key, ended=now)
                written += 1
        return written

    return daemon.call_writer(work)
