"""``ckptd resume``: carry an interrupted run on as a new attempt.

How a resume works, end to end:

1. The daemon begins the attempt atomically (the ``begin_attempt``
   operation, :mod:`ckptd.autoresume`): it refuses a run that is ``running``
   or ``finished`` (unless forced), numbers the next attempt, marks the run
   ``running`` under the caller's pid as its supervisor, and returns the
   recorded command, directory and environment.
2. A supervisor (:mod:`ckptd.supervise`) starts that command in that
   directory with that environment, plus ``CKPTD_RUN_ID`` and
   ``CKPTD_ATTEMPT``. With ``--detach`` the supervisor is a process of its
   own session, so closing the terminal (or restarting the daemon) does not
   stop the run.
3. Inside, ``ckptd_client.init()`` joins the run with ``run.resumed`` true;
   ``run.restore()`` loads the newest verified checkpoint and reports its
   step to the daemon (a ``restored`` event). The store then marks what
   earlier attempts logged after that step as superseded, so ``ckptd
   metrics`` and ``tail`` show the effective timeline.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptd_client import paths, transport
from ckptd_client.errors import CkptdError, error_for

from ckptd.store import query
from ckptd.supervise import scope as scopes

_log = logging.getLogger("ckptd.supervise")

#: Output of a detached supervisor (and its command) also goes here.
SUPERVISOR_LOG = "supervisor.log"
#: How long ``resume --detach`` waits for the supervisor to begin the attempt.
REPORT_TIMEOUT = 60.0


def begin_attempt(home: Path, run_id: str, *, force: bool = False,
                  after_attempt: int | None = None) -> dict[str, Any]:
    """Ask the daemon to begin the next attempt with this process as supervisor.

    ``after_attempt`` (auto-resume) makes it a no-op unless that attempt is
    still the current one, so two relaunchers never start the same attempt.

    :raises ResumeRefused: running or finished (unless ``force``), or already relaunched.
    :raises NotFound: no such run.
    """
    args: dict[str, Any] = {"run": run_id, "force": force}
    if after_attempt is not None:
        args["after_attempt"] = after_attempt
    return transport.call(home, "begin_attempt", args)


def supervisor_log(home: Path, run_id: str) -> Path:
    return paths.run_dir(home, run_id) / SUPERVISOR_LOG


def spawn_supervisor(home: Path, run_id: str, *, force: bool = False,
                     after_attempt: int | None = None, report: bool = True,
                     env: dict[str, str] | None = None,
                     scope: bool = False) -> tuple[subprocess.Popen[bytes],
                                                   dict[str, Any] | None]:
    """Start a detached ``ckptd run --attach-run RUN`` supervisor.

    Detached means: its own session (no terminal signal reaches it), no
    pipe to us (our exit, or the daemon's, cannot break its output), output
    appended to ``runs/<id>/supervisor.log``. With ``report`` we wait until
    it has begun the attempt and return what the daemon answered it.

    ``scope`` (the daemon's relaunches): where this process is a systemd
    service's, the supervisor gets a transient scope of its own, so a clean
    shutdown stops it with SIGTERM instead of SIGKILLing it as a leftover of
    a ``KillMode=process`` unit (:mod:`ckptd.supervise.scope`).
    """
    log_path = supervisor_log(home, run_id)
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    cmd = [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "run",
           "--attach-run", run_id]
    if force:
        cmd.append("--force")
    if after_attempt is not None:
        cmd += ["--after-attempt", str(after_attempt)]
    read_fd = write_fd = -1
    if report:
        read_fd, write_fd = os.pipe()
        cmd += ["--report-fd", str(write_fd)]
    from ckptd.daemon.server import USER_UMASK

    manager = scopes.manager() if scope else None
    # the run's output: as private as the store
    with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600),
              "ab") as log:

        def start(argv: list[str]) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                start_new_session=True, close_fds=True,
                pass_fds=(write_fd,) if report else (), env=env,
                umask=USER_UMASK)  # a relaunch by the daemon: not the daemon's 077

        try:
            proc = None
            if manager is not None:
                from ckptd.supervise.supervisor import stop_grace_default

                attempt = (after_attempt or 0) + 1
                unit = scopes.unit_name(run_id, attempt)
                grace = stop_grace_default(env)
                try:
                    proc = start(scopes.command(cmd, unit, manager,
                                                grace + scopes.STOP_MARGIN_S))
                    why = scopes.wait_entered(proc, unit)
                except OSError as exc:
                    why = str(exc)
                if why is None:
                    _log.info("run %s: supervisor pid %d in its own %s scope %s", run_id,
                              proc.pid, manager, unit)
                else:
                    proc = None
                    _log.warning(
                        "run %s: cannot give the supervisor a systemd scope (%s; see %s); "
                        "starting it in the daemon's cgroup instead, where a clean shutdown "
                        "SIGKILLs it without a grace period", run_id, why, log_path)
            if proc is None:
                proc = start(cmd)
        finally:
            if report:
                os.close(write_fd)
    if not report:
        return proc, None
    try:
        answer = _read_report(read_fd, REPORT_TIMEOUT)
    finally:
        os.close(read_fd)
    if answer is None:
        code = proc.poll()
        raise CkptdError(
            f"resume {run_id}: the supervisor "
            + (f"exited with status {code}" if code is not None else "did not answer")
            + f" before beginning the attempt; see {log_path}")
    if not answer.get("ok"):
        raise error_for(answer.get("kind"), str(answer.get("error")))
    return proc, answer["begun"]


def _read_report(fd: int, timeout: float) -> dict[str, Any] | None:
    data = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        return None


def write_report(fd: int, answer: dict[str, Any]) -> None:
    """The supervisor's side of ``--report-fd``: one JSON object, then EOF."""
    try:
        os.write(fd, json.dumps(answer).encode())
    except OSError:
        pass  # the resumer went away: the run goes on regardless
    finally:
        os.close(fd)


def resume(home: Path, ref: str | None, *, detach: bool = False, force: bool = False,
           out: Callable[[str], None] = print, stop_grace: float | None = None) -> int:
    """``ckptd resume RUN``: relaunch ``ref`` as its next attempt.

    In the foreground this process supervises the attempt and returns its
    exit status; with ``detach`` it returns as soon as the attempt began.
    """
    with query.Reader(home) as reader:
        run = reader.resolve(ref)
    if detach:
        env = None
        if stop_grace is not None:
            from ckptd.supervise.supervisor import STOP_GRACE_ENV

            env = dict(os.environ, **{STOP_GRACE_ENV: str(stop_grace)})
        proc, begun = spawn_supervisor(home, run["id"], force=force, env=env)
        assert begun is not None
        out(f"resumed run {run['id']} as attempt {begun['attempt']} in the background "
            f"(supervisor pid {proc.pid}); follow it with `ckptd tail -f {run['id']}`; "
            f"terminal output also goes to {supervisor_log(home, run['id'])}")
        return 0
    begun = begin_attempt(home, run["id"], force=force)
    print(f"ckptd: resuming run {run['id']} as attempt {begun['attempt']}", file=sys.stderr)
    from ckptd.supervise.supervisor import attach_run

    return attach_run(home, begun, stop_grace)


__all__ = ["begin_attempt", "resume", "spawn_supervisor", "write_report"]
