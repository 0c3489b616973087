"""Daemon side of resuming: beginning attempts, and auto-resume.

``begin_attempt`` (an RPC) is the one place a new attempt is numbered, in
the writer's transaction, so a person's ``ckptd resume`` and the daemon's
auto-resume can never both start one.

Auto-resume is level-triggered: every sweep (after liveness has marked
vanished runs ``interrupted``, and so also at start after a reboot) the
daemon looks at runs with auto-resume on whose last attempt ended
``interrupted`` or ``failed``, and relaunches those whose backoff has
passed. A relaunch is a detached ``ckptd run --attach-run`` supervisor in
its own session with no pipe to the daemon: restarting the daemon does not
touch it. Under systemd it also gets a transient scope of its own, so a
clean shutdown stops it with SIGTERM like a run started from a login
(:mod:`ckptd.supervise.scope`). A run stops being relaunched, with the
reason recorded, when

* it used up ``--max-restarts``, or
* its last ``SAME_STEP_LIMIT`` attempts all ended at the same step (no
  progress: a crash that resuming cannot fix; one that fails at once too).

Admission control keeps a reboot from relaunching every run in the same
instant (each loading its checkpoint and its GPU memory at once): at most
``--max-concurrent-resumes`` (``CKPTD_MAX_CONCURRENT_RESUMES``, default 2)
relaunches are starting up at a time. A relaunch holds its slot until its
attempt has a process and has either run ``CKPTD_RESUME_SETTLE_S`` seconds
(default 60) or logged a step past the one it restored. Runs that are due
but wait for a slot are ``queued`` (``ckptd ls``). With
``CKPTD_RESUME_GPU_FREE_MIB`` set, a relaunch also waits until some GPU has
that much free memory (``nvidia-smi``; no GPU or no ``nvidia-smi``: no
wait). Backoffs carry a per-run jitter, so runs that failed together do not
come back together.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
import zlib
from typing import TYPE_CHECKING, Any

from ckptd_client.errors import CkptdError
from ckptd_client.identity import boot_id, process_start_time, valid_run_id

if TYPE_CHECKING:
    from ckptd.daemon.server import Conn, Daemon
    from ckptd.store.writer import Store

log = logging.getLogger("ckptd.autoresume")

#: First relaunch waits this long after the attempt ended; doubling each time.
BACKOFF_ENV = "CKPTD_RESTART_BACKOFF"
DEFAULT_BACKOFF_S = 10.0
MAX_BACKOFF_S = 600.0
#: Attempts in a row ending at the same step before we stop relaunching.
SAME_STEP_LIMIT = 3
#: A relaunched supervisor that has not begun its attempt after this long is
#: no longer waited for (it is looked at again by the next sweep).
PENDING_S = 60.0

#: Supervisors this daemon started, by run id, until they began (or gave up).
_pending: dict[str, tuple[subprocess.Popen[bytes], float]] = {}

MAX_CONCURRENT_ENV = "CKPTD_MAX_CONCURRENT_RESUMES"
DEFAULT_MAX_CONCURRENT = 2
SETTLE_ENV = "CKPTD_RESUME_SETTLE_S"
DEFAULT_SETTLE_S = 60.0
GPU_FREE_ENV = "CKPTD_RESUME_GPU_FREE_MIB"
#: Most of the backoff added as jitter (a fraction of it, fixed per run and restart).
JITTER = 0.25


def _env_number(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


def max_concurrent(daemon: Daemon) -> int:
    """Relaunches allowed to start up at once: the daemon's option, else the variable."""
    n = getattr(daemon, "max_concurrent_resumes", None)
    if n is None:
        n = int(_env_number(MAX_CONCURRENT_ENV, DEFAULT_MAX_CONCURRENT))
    return max(1, n)


def gpu_free_mib() -> list[int] | None:
    """Free memory of each GPU in MiB, or None when there is no GPU to ask about."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        free = [int(float(x)) for x in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return free or None


def gpu_ready(needed_mib: float, free: list[int] | None) -> bool:
    """Whether a relaunch needing ``needed_mib`` may start (no GPU seen: yes)."""
    return needed_mib <= 0 or free is None or max(free) >= needed_mib


def begin_attempt(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    """Begin the next attempt with the calling process as its supervisor."""
    run_id = args.get("run")
    after = args.get("after_attempt")
    if not isinstance(run_id, str) or not valid_run_id(run_id):
        raise CkptdError("begin_attempt: run must be a run id")
    if after is not None and (not isinstance(after, int) or isinstance(after, bool)):
        raise CkptdError("begin_attempt: after_attempt must be an integer")
    # A checkpoint the interrupted attempt sent may still be committing (or
    # unread in its connection): the step to resume from is chosen after it.
    from ckptd.daemon.checkpoints import await_commits

    pending = await_commits(daemon, run_id)
    if pending:
        log.warning("run %s: resuming with %d checkpoint commit(s) still in flight", run_id,
                    pending)
    # What the interrupted attempt left in the spool belongs before the cut.
    daemon.ingest_spools_now()
    current_boot = boot_id()
    started = process_start_time(conn.pid)
    host = os.uname().nodename

    def work(store: Store) -> dict[str, Any]:
        return store.begin_attempt(
            run_id, force=bool(args.get("force")), auto=after is not None,
            after_attempt=after, supervisor_pid=conn.pid, supervisor_started=started,
            boot_id=current_boot, host=host)

    begun = daemon.call_writer(work)
    log.info("run %s: attempt %d begun by pid %d", run_id, begun["attempt"], conn.pid)
    return begun


def backoff(restarts: int, key: str = "") -> float:
    """Seconds between an attempt's end and its relaunch; with ``key`` (the run
    id) plus up to ``JITTER`` of it, fixed per run and restart, so equal
    backoffs do not keep runs that died together in lockstep."""
    try:
        base = float(os.environ.get(BACKOFF_ENV, DEFAULT_BACKOFF_S))
    except ValueError:
        base = DEFAULT_BACKOFF_S
    delay = min(base * 2 ** max(restarts, 0), MAX_BACKOFF_S)
    if key:
        delay *= 1 + JITTER * (zlib.crc32(f"{key}/{restarts}".encode()) / 0xFFFFFFFF)
    return delay


def stuck(peaks: list[tuple[int, int | None]], limit: int = SAME_STEP_LIMIT) -> str | None:
    """Why relaunching is pointless, or None: the last ``limit`` attempts
    all ended at the same step (``None``: before logging any)."""
    if len(peaks) < limit:
        return None
    last = peaks[-limit:]
    steps = {step for _, step in last}
    if len(steps) != 1:
        return None
    step = steps.pop()
    where = f"step {step}" if step is not None else "start-up (before logging a step)"
    return (f"attempts {last[0][0]}-{last[-1][0]} all ended at {where} without progress; "
            "fix the cause, then `ckptd resume` it")


def scan(daemon: Daemon, now: float | None = None) -> list[str]:
    """Relaunch every auto-resume run that is due and admitted; return their ids."""
    if daemon.stop.is_set():
        return []  # shutting down: the writer may be gone, and nothing new starts
    now = time.time() if now is None else now
    limit_n = max_concurrent(daemon)
    settle = _env_number(SETTLE_ENV, DEFAULT_SETTLE_S)
    gpu_need = _env_number(GPU_FREE_ENV, 0)
    for run_id, (proc, since) in list(_pending.items()):
        if proc.poll() is not None or now - since > PENDING_S:
            del _pending[run_id]

    def work(store: Store) -> tuple[list[dict[str, Any]], int]:
        due = []
        for run in store.auto_resume_candidates():
            if run["id"] in _pending:
                continue
            restarts, limit = run["restarts"] or 0, run["max_restarts"]
            why = None
            if limit is not None and restarts >= limit:
                why = f"it was relaunched {restarts} times (--max-restarts {limit})"
            elif run["attempt"] >= SAME_STEP_LIMIT:
                # runs in the writer thread: read only the attempts stuck() judges
                why = stuck(store.attempt_peaks(run["id"], SAME_STEP_LIMIT))
            if why is not None:
                reason = f"auto-resume stopped: {why}"
                full = f"{run['reason']}; {reason}" if run.get("reason") else reason
                fields: dict[str, Any] = {"auto_resume": 0, "reason": full}
                if run["status"] == "queued":
                    fields["status"] = "interrupted"
                store.mark_run(run["id"], **fields)
                store.record_event(run["id"], run["attempt"], reason, level="error")
                log.warning("run %s: %s", run["id"], reason)
                continue
            if now < (run["ended"] or 0) + backoff(restarts, run["id"]):
                continue
            due.append(run)
        settling = set(store.settling_resumes(now, settle))
        begun = [r for r in _pending if r in settling]
        for r in begun:  # it runs now: counted by the store from here on
            _pending.pop(r, None)
        busy = len(settling | set(_pending))
        due.sort(key=lambda r: r["ended"] or 0)  # the longest waiting first
        free = max(0, limit_n - busy)
        for run in due[free:]:
            if run["status"] != "queued":
                store.mark_run(run["id"], status="queued")
                store.record_event(
                    run["id"], run["attempt"],
                    f"auto-resume queued: {busy} relaunch(es) starting up, at most {limit_n} "
                    f"at a time (--max-concurrent-resumes)")
        return due[:free], busy

    relaunch, _busy = daemon.call_writer(work)
    if relaunch and gpu_need > 0 and not gpu_ready(gpu_need, free := gpu_free_mib()):
        log.info("auto-resume: waiting for a GPU with %.0f MiB free (now %s MiB)", gpu_need,
                 free)
        daemon.call_writer(lambda store: [store.mark_run(r["id"], status="queued")
                                          for r in relaunch if r["status"] != "queued"])
        return []
    relaunched = []
    for run in relaunch:
        from ckptd.supervise.resume import spawn_supervisor

        try:
            proc, _ = spawn_supervisor(daemon.home, run["id"], after_attempt=run["attempt"],
                                       report=False, scope=True)
        except OSError as exc:
            log.error("run %s: cannot start a supervisor: %s", run["id"], exc)
            continue
        _pending[run["id"]] = (proc, now)
        relaunched.append(run["id"])
        log.info("run %s: auto-resume after attempt %d (%s), supervisor pid %d", run["id"],
                 run["attempt"], run["status"], proc.pid)
    return relaunched


# Level-triggered, not a callback on each verdict: the sweeper runs this
# right after liveness each period, and it also sees runs whose supervisor
# reported the end (``failed``, a signal) and runs whose backoff just passed.
