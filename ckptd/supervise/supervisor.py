"""``ckptd run``: launch a training command under supervision.

The supervisor is a small process between the terminal and the training
command. It

* registers the run with everything ``ckptd resume`` needs to relaunch it
  (command, cwd, environment, provenance), before the command starts;
* starts the command with ``CKPTD_RUN_ID`` / ``CKPTD_ATTEMPT`` set, so the
  client inside joins this run instead of creating another;
* captures stdout and stderr at the file-descriptor level (pipes, or a pty
  for stdout when we run in a terminal, so the command still line-buffers
  and draws progress bars), copies every byte through to our own stdout and
  stderr, and sends each finished line to the daemon as a console event
  (``src`` ``"s"``); a ``\\r``-redrawn progress bar is stored once, in its
  last state;
* records how the command ended (exit code or signal) as the attempt's status.

Its liveness is recorded too (``runs.supervisor_pid``): while it lives, the
run is ``running`` even before the command has registered its own pid.

Relaunches (``ckptd resume``, auto-resume) use the same class for a new
attempt of an existing run; the daemon begins the attempt atomically
(:func:`ckptd.resume.begin_attempt`), then this process supervises it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Mapping
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

from ckptd_client import Run
from ckptd_client.distributed import LINE_PREFIX, LINE_PREFIX_ENV, line_rank
from ckptd_client.errors import CkptdError
from ckptd_client.identity import boot_id, new_run_id, process_start_time, system_stopping
from ckptd_client.provenance import collect

#: A line longer than this without a newline is stored in pieces (bounded memory).
MAX_LINE = 64 * 1024
#: After the command exits, how long to keep reading output that its
#: children (which may hold the pipes) still write.
DRAIN_S = 2.0
#: Signals a person (or systemd) uses to stop a run; forwarded to the command.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Seconds the command gets to exit after a stop signal before its process
#: group is killed (``--stop-grace``; what ``docker stop`` and systemd's
#: ``TimeoutStopSec`` do). The environment variable sets it for supervisors
#: ckptd starts itself (``resume --detach``, auto-resume).
STOP_GRACE_ENV = "CKPTD_STOP_GRACE"
DEFAULT_STOP_GRACE = 30.0
DEFAULT_MAX_RESTARTS = 10


class LineSplitter:
    """Bytes in, finished lines out.

    A line is what ends in ``\\n``. Within a line, a ``\\r`` starts the
    line over (how tqdm redraws its bar), so only the text after the last
    ``\\r`` is kept: a bar that redraws ten thousand times is one line.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[str]:
        self._buf += data
        out: list[str] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            out.append(_collapse(bytes(self._buf[:nl])))
            del self._buf[: nl + 1]
        if len(self._buf) > self._limit:
            cr = self._buf.rfind(b"\r", 0, len(self._buf) - 1)
            if cr >= 0:
                del self._buf[: cr + 1]  # older states of a bar: never shown again
            if len(self._buf) > self._limit:
                out.append(_collapse(bytes(self._buf)))
                self._buf.clear()
        return out

    def close(self) -> list[str]:
        """The unfinished last line, if any (a program that exits mid-line)."""
        rest, self._buf = bytes(self._buf), bytearray()
        text = _collapse(rest)
        return [text] if text else []


def _collapse(line: bytes) -> str:
    parts = [p for p in line.split(b"\r") if p]
    return parts[-1].decode("utf-8", errors="replace") if parts else ""


def child_env(recorded: Mapping[str, str], home: Path, run_id: str, attempt: int) -> dict[str, str]:
    """The environment of attempt ``attempt``: the recorded one, with ckptd's
    own settings taken from the ckptd that launches it now (a recorded
    ``CKPTD_SOCKET`` or test hook from last week must not win), and the
    run's identity."""
    env = {k: v for k, v in recorded.items() if not k.startswith("CKPTD_")}
    env.update({k: v for k, v in os.environ.items() if k.startswith("CKPTD_")})
    env.update(CKPTD_HOME=os.fspath(home), CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT=str(attempt))
    env.pop("CKPTD_AUTOSTARTED", None)
    # torchrun (with --tee) prefixes each rank's lines so we can record whose they are
    env.setdefault(LINE_PREFIX_ENV, LINE_PREFIX)
    return env


def torch_cuda_version() -> str | None:
    """The CUDA version torch was built with, read without importing torch (seconds)."""
    try:
        spec = importlib_util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return None
    m = re.search(r"^cuda\s*(?::\s*\S+)?\s*=\s*'([^']*)'", text, re.M)
    return m.group(1) if m else None


def exit_status(returncode: int, stopped_by: int | None,
                escalated_after: float | None = None) -> dict[str, Any]:
    """How an attempt ended, from its exit status, as the run's new state.

    Who meant it to stop decides whether auto-resume may bring it back:

    * a stop signal (SIGTERM, SIGINT, SIGHUP) to ``ckptd run``, or one sent to
      the command itself, is a person's (or systemd's) stop: ``interrupted``,
      and auto-resume is switched off for the run (``auto_resume: 0``);
    * SIGKILL alone is what the OOM killer sends: ``interrupted``, relaunched;
    * any other death (SIGSEGV, SIGABRT, a non-zero exit) is ``failed``,
      relaunched until auto-resume sees no progress.
    """
    if returncode == 0:
        return {"status": "finished", "exit_code": 0, "reason": "exited with status 0"}
    stop = {"status": "interrupted", "auto_resume": 0}
    if returncode < 0:
        sig = -returncode
        name = _signame(sig)
        if stopped_by is not None:
            reason = f"stopped: {_signame(stopped_by)} to `ckptd run`, then killed by {name}"
            if escalated_after is not None:
                reason += (f" (it was still running {escalated_after:g} s after "
                           f"{_signame(stopped_by)}; --stop-grace)")
            return {**stop, "exit_code": None, "signal": sig, "reason": reason}
        if sig in STOP_SIGNALS:
            return {**stop, "exit_code": None, "signal": sig,
                    "reason": f"stopped: killed by {name} sent to the process itself"}
        status = "interrupted" if sig == signal.SIGKILL else "failed"
        return {"status": status, "exit_code": None, "signal": sig, "reason": f"killed by {name}"}
    if stopped_by is not None:
        return {**stop, "exit_code": returncode,
                "reason": f"stopped: {_signame(stopped_by)} to `ckptd run`"}
    return {"status": "failed", "exit_code": returncode,
            "reason": f"exited with status {returncode}"}


def stop_grace_default(environ: Mapping[str, str] | None = None) -> float:
    try:
        env = os.environ if environ is None else environ
        return max(0.0, float(env.get(STOP_GRACE_ENV, DEFAULT_STOP_GRACE)))
    except ValueError:
        return DEFAULT_STOP_GRACE


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class Supervisor:
    """Runs one attempt of a run: spawn, capture, report how it ended."""

    def __init__(self, home: Path, run_id: str, attempt: int, command: list[str],
                 cwd: str | None, env: dict[str, str], *, name: str | None = None,
                 register: dict[str, Any] | None = None,
                 stop_grace: float | None = None, requeue_job: str | None = None) -> None:
        self.home = home
        self.requeue_job = requeue_job  # ``--requeue`` under SLURM (supervise/slurm.py)
        self.run_id = run_id
        self.attempt = attempt
        self.command = command
        self.cwd = cwd
        self.env = env
        self.name = name
        self.register = register
        self.stop_grace = stop_grace_default() if stop_grace is None else stop_grace
        self.stopped_by: int | None = None
        self.status = "running"
        self.proc: subprocess.Popen[bytes] | None = None
        self._own_group = True
        self._kill_at: float | None = None
        self._escalated = False
        self._exited = threading.Event()
        self._released = threading.Event()

    def run(self) -> int:
        """Supervise the attempt to its end; return the exit status to exit with."""
        run = Run(self.home, self.run_id, self.attempt, name=self.name, src="s")
        run.start(self.register)
        with contextlib.suppress(Exception):
            # the registration is committed before the command can join it
            run.flush(timeout=10)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            try:
                sources = self._spawn()
            except OSError as exc:
                msg = f"ckptd: cannot start {self.command[0]!r}: {exc.strerror or exc}"
                print(msg, file=sys.stderr)
                run.console(msg, "stderr")
                run.finish(status="failed", exit_code=127, reason=msg[7:])
                return 127
            assert self.proc is not None
            if self.stopped_by is not None:  # a stop that came while we started it
                self._forward(self.stopped_by)
            run.register_process(self.proc.pid)
            pump = threading.Thread(target=self._pump, args=(run, sources), daemon=True,
                                    name="ckptd-pump")
            pump.start()
            handover = threading.Thread(target=self._hand_over, args=(sources,), daemon=True,
                                        name="ckptd-handover")
            handover.start()
            returncode = self._wait(run)
            self._exited.set()
            pump.join(timeout=DRAIN_S + 5)
            # only now: a release sent earlier would leave the daemon no copy
            # to read from if we died while draining
            self._released.set()
            handover.join(timeout=5)
            for fd, _stream, _out in sources:
                with contextlib.suppress(OSError):
                    os.close(fd)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        ended = exit_status(returncode, self.stopped_by,
                            self.stop_grace if self._escalated else None)
        if self.stopped_by is not None and system_stopping():
            # The stop came from a clean shutdown or reboot, not from a person:
            # the run comes back by itself at the next boot (tests/boot).
            ended.pop("auto_resume", None)
            ended["reason"] = (f"stopped by the system shutting down "
                               f"({_signame(self.stopped_by)}); auto-resume at next boot")
        requeue = self.requeue_job is not None and returncode == 0 and self._preempted()
        if requeue:
            # The allocation ends soon: SLURM relaunches the job, not the daemon here.
            ended.update(auto_resume=0, reason=f"preempted; SLURM job {self.requeue_job} "
                                               "requeued (ckptd run --requeue)")
        self.status, exit_code = ended.pop("status"), ended.pop("exit_code")
        # who reports: the store applies it to the run's current attempt when
        # TorchElastic restarts inside the command began later ones (writer._status_attempt)
        run.finish(status=self.status, exit_code=exit_code, timeout=30,
                   supervisor_pid=os.getpid(), supervisor_started=process_start_time(), **ended)
        code = returncode if returncode >= 0 else 128 - returncode
        if requeue:
            assert self.requeue_job is not None
            from ckptd.supervise import slurm

            # after finish: requeueing makes SLURM stop this job, us included
            why = slurm.requeue(self.requeue_job)
            if why is None:
                print(f"ckptd: run {self.run_id} preempted after its checkpoint; requeued "
                      f"SLURM job {self.requeue_job}", file=sys.stderr, flush=True)
            else:
                print(f"ckptd: run {self.run_id} preempted, but requeueing failed ({why}); "
                      f"continue it with `ckptd resume {self.run_id}`", file=sys.stderr,
                      flush=True)
                code = code or 1
        return code

    def _preempted(self) -> bool:
        """Whether the attempt's trainer ended it ``preempted`` (it checkpointed after
        a notice and exited), with every checkpoint it sent committed.

        Read from the store before our own report: the trainer's status is
        durable once its ``finish()`` returned. ``ckpt_await_commits`` closes the
        window where a checkpoint was still committing (the requeued job must
        find it)."""
        from ckptd_client import transport

        from ckptd.store import query

        with contextlib.suppress(Exception):
            transport.call(self.home, "ckpt_await_commits", {"run": self.run_id})
        try:
            with query.Reader(self.home) as reader:
                rows = reader.rows("SELECT a.status FROM attempts a JOIN runs r ON"
                                   " r.id = a.run_id AND r.attempt = a.attempt WHERE"
                                   " r.id = ?", (self.run_id,))
        except Exception:  # noqa: BLE001 - no store to read: do not requeue blindly
            return False
        return bool(rows) and rows[0]["status"] == "preempted"

    def _wait(self, run: Run) -> int:
        """Wait for the command; SIGKILL its process group once a stop's grace is over."""
        assert self.proc is not None
        while True:
            try:
                return self.proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
            if self._kill_at is not None and not self._escalated \
                    and time.monotonic() >= self._kill_at:
                self._escalated = True
                assert self.stopped_by is not None
                text = (f"the command was still running {self.stop_grace:g} s after "
                        f"{_signame(self.stopped_by)}; sending SIGKILL to its process group")
                print(f"ckptd: {text}", file=sys.stderr, flush=True)
                with contextlib.suppress(Exception):
                    run.event(text, level="warning")
                self._kill_group()

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Remember who stopped us, pass the signal on, start the grace period.

        A signal handler: it only sets fields and sends signals."""
        if self.stopped_by is None:
            self.stopped_by = signum
            self._kill_at = time.monotonic() + self.stop_grace
        if self.proc is not None:
            self._forward(signum)

    def _forward(self, signum: int) -> None:
        assert self.proc is not None
        if not self._own_group and signum == signal.SIGINT:
            return  # the terminal sent it to the command too (our process group)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self._own_group:
                os.killpg(self.proc.pid, signum)
            else:
                self.proc.send_signal(signum)

    def _kill_group(self) -> None:
        """SIGKILL the command and everything it started."""
        assert self.proc is not None
        if self._own_group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return
        import psutil

        try:
            victims = [psutil.Process(self.proc.pid)]
            victims += victims[0].children(recursive=True)
        except psutil.Error:
            victims = []
        for p in victims:
            with contextlib.suppress(psutil.Error):
                p.kill()

    def _spawn(self) -> list[tuple[int, str, int]]:
        """Start the command; return ``(read fd, stream, pass-through fd)`` pairs.

        The command gets a process group of its own, so a stop can reach
        everything it started (and SIGKILL it after the grace period) without
        killing us. Except when we run in the foreground of a terminal: there
        it stays in ours, so it can still read the terminal (``breakpoint()``)
        and Ctrl-C reaches it from the terminal directly.
        """
        out_r, out_w = _stdout_channel()
        err_r, err_w = os.pipe()
        self._own_group = not _terminal_foreground()
        group: dict[str, Any] = {}
        if self._own_group:
            group = {"process_group": 0} if sys.version_info >= (3, 11) \
                else {"preexec_fn": os.setpgrp}
        try:
            self.proc = subprocess.Popen(
                self.command, cwd=self.cwd or None, env=self.env, stdin=None,
                stdout=out_w, stderr=err_w, close_fds=True, **group)
        except OSError:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        os.close(out_w)
        os.close(err_w)
        return [(out_r, "stdout", 1), (err_r, "stderr", 2)]

    def _hand_over(self, sources: list[tuple[int, str, int]]) -> None:
        """Keep the daemon holding a copy of our read ends (:mod:`ckptd.console`),
        so our death does not kill the command at its next print; hand them
        again to a restarted daemon; release them once we read everything."""
        from ckptd_client import paths, protocol, transport

        from ckptd.daemon.console import CONSOLE_FDS, CONSOLE_RELEASE

        hello = protocol.encode({"t": CONSOLE_FDS, "run": self.run_id, "attempt": self.attempt,
                                 "streams": [stream for _, stream, _ in sources]})
        while not self._released.is_set():
            try:
                sock = transport.connect(paths.socket_path(self.home))
            except Exception:  # noqa: BLE001 - no daemon now: try again shortly
                self._released.wait(1.0)
                continue
            try:
                socket.send_fds(sock, [hello], [fd for fd, _, _ in sources])
                sock.settimeout(None)
                while not self._released.is_set():
                    ready, _, _ = select.select([sock], [], [], 0.2)
                    if ready and not sock.recv(4096):
                        break  # the daemon went away: hand them to the next one
                else:
                    sock.sendall(protocol.encode({"t": CONSOLE_RELEASE}))
            except OSError:
                self._released.wait(1.0)
            finally:
                sock.close()

    def _pump(self, run: Run, sources: list[tuple[int, str, int]]) -> None:
        """Copy output through and record it line by line, until the command
        exited and its output is drained (or ``DRAIN_S`` after the exit, when
        a grandchild keeps the pipes open)."""
        live = {fd: (stream, out, LineSplitter()) for fd, stream, out in sources}
        passthrough = {1: True, 2: True}
        deadline: float | None = None
        while live:
            if deadline is None and self._exited.is_set():
                deadline = time.monotonic() + DRAIN_S
            if deadline is not None and time.monotonic() > deadline:
                break
            try:
                ready, _, _ = select.select(list(live), [], [], 0.2)
            except InterruptedError:
                continue
            for fd in ready:
                stream, out, splitter = live[fd]
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the pty's other side closed
                    data = b""
                if not data:
                    lines = splitter.close()
                    del live[fd]
                else:
                    if passthrough[out]:
                        passthrough[out] = _write_all(out, data)
                    lines = splitter.feed(data)
                now = time.time()
                for line in lines:
                    rank, text = line_rank(line)
                    run.console(text, stream, when=now, rank=rank)
        for _fd, (stream, _out, splitter) in live.items():
            for line in splitter.close():
                rank, text = line_rank(line)
                run.console(text, stream, rank=rank)


def _terminal_foreground() -> bool:
    """True when stdin is a terminal and we are its foreground process group."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _stdout_channel() -> tuple[int, int]:
    """A pty when our stdout is a terminal (the command keeps line buffering
    and its progress bars), else a pipe."""
    if os.isatty(1):
        try:
            import pty

            master, slave = pty.openpty()
            with contextlib.suppress(OSError):
                size = fcntl.ioctl(1, termios.TIOCGWINSZ, b"\0" * 8)
                fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
            return master, slave
        except OSError:
            pass
    return os.pipe()


def _write_all(fd: int, data: bytes) -> bool:
    """Pass output through; False once our own output is gone (closed
    terminal, broken pipe), after which we only record."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError:
            return False
        view = view[n:]
    return True


class InvalidRun(CkptdError):
    """``ckptd run`` with something the daemon would refuse to record."""

    exit_code = 2


def check_register(register: dict[str, Any]) -> None:
    """Refuse, before anything starts, a registration the daemon would reject.

    Launched anyway, the command would run but the run would lose what
    ``ckptd resume`` needs (the daemon drops the whole frame).

    :raises InvalidRun: one line naming what is wrong.
    """
    from ckptd_client import protocol

    from ckptd.daemon import validate

    msg = dict(register, t=protocol.REGISTER, seq=1, time=time.time())
    try:
        validate.event(msg)
        protocol.encode(msg)
    except protocol.ProtocolError:
        raise InvalidRun(f"run: the command, directory and environment to record exceed the "
                         f"daemon's {protocol.MAX_FRAME}-byte limit; nothing was started") \
            from None
    except validate.Invalid as exc:
        text = str(exc).removeprefix("register: ")
        if text.startswith("name "):
            text = "--" + text
        raise InvalidRun(f"run: {text}; nothing was started") from None


def run_command(home: Path, command: list[str], *, name: str | None = None,
                auto_resume: bool = False, max_restarts: int | None = None,
                stop_grace: float | None = None, group: str | None = None,
                run_id: str | None = None, requeue: bool = False) -> int:
    """``ckptd run -- CMD``: register a new run for ``command`` and supervise it.

    ``run_id`` is given by a launcher that recorded the id before starting us
    (``ckptd sweep``), so a crash right after the launch cannot start it twice.
    ``requeue``: under SLURM, the run is named after the job and a preempted
    attempt requeues it; a requeued job continues its run (supervise/slurm.py).

    :raises InvalidRun: the name, command or environment cannot be recorded.
    """
    job = None
    if requeue:
        from ckptd.supervise import slurm

        job = slurm.job_id()
        if job is None:
            print("ckptd: --requeue: not under SLURM (SLURM_JOB_ID is not set); a preempted "
                  "attempt is not requeued", file=sys.stderr)
        else:
            run_id = slurm.run_id_for_job(job)
            begun = _continue_job(home, run_id)
            if begun is not None:
                print(f"ckptd: SLURM job {job} requeued: run {run_id} continues as attempt "
                      f"{begun['attempt']}", file=sys.stderr)
                return attach_run(home, begun, stop_grace, requeue_job=job)
    cwd = os.getcwd()
    env = dict(os.environ)
    for key in ("CKPTD_RUN_ID", "CKPTD_ATTEMPT"):
        env.pop(key, None)
    run_id = run_id or new_run_id()
    provenance = collect(cwd)
    provenance.update(seed=None, command_executable=shutil.which(command[0],
                                                                 path=env.get("PATH")))
    if provenance.get("cuda") is None:
        provenance["cuda"] = torch_cuda_version()
    register = {
        "name": name, "group": group, "command": command, "cwd": cwd, "env": env,
        "provenance": provenance,
        "supervisor_pid": os.getpid(), "supervisor_started": process_start_time(),
        "boot_id": boot_id(), "host": socket.gethostname(), "joined": False,
        "auto_resume": int(auto_resume),
        "max_restarts": (max_restarts if max_restarts is not None else DEFAULT_MAX_RESTARTS)
        if auto_resume else None,
    }
    check_register(register)
    sup = Supervisor(home, run_id, 1, command, cwd, child_env(env, home, run_id, 1),
                     name=name, register=register, stop_grace=stop_grace, requeue_job=job)
    code = sup.run()
    if auto_resume and sup.status != "finished" and sup.stopped_by is None:
        print(f"ckptd: run {run_id} {sup.status}; the daemon relaunches it from its newest "
              f"checkpoint (follow it with `ckptd tail -f {run_id}`)", file=sys.stderr)
    elif sup.status in ("interrupted", "failed"):
        # the exact line to type (the id: names may repeat; --home only when not implied)
        import shlex

        from ckptd_client import paths

        where = "" if home == paths.home_dir() else f" --home {shlex.quote(os.fspath(home))}"
        print(f"ckptd: run {run_id} {sup.status}; resume it from its newest checkpoint "
              f"with:\n  ckptd resume{where} {run_id}", file=sys.stderr)
    return code


def attach_run(home: Path, begun: dict[str, Any], stop_grace: float | None = None,
               requeue_job: str | None = None) -> int:
    """Supervise an attempt the daemon has begun (``ckptd resume``, auto-resume)."""
    env = child_env(begun.get("env") or {}, home, begun["id"], begun["attempt"])
    sup = Supervisor(home, begun["id"], begun["attempt"], begun["command"], begun.get("cwd"),
                     env, name=begun.get("name"), stop_grace=stop_grace,
                     requeue_job=requeue_job)
    return sup.run()


def _continue_job(home: Path, run_id: str) -> dict[str, Any] | None:
    """The next attempt of a requeued SLURM job's run, or None when the job is new."""
    from ckptd.store import query
    from ckptd.supervise.resume import begin_attempt

    try:
        with query.Reader(home) as reader:
            if not reader.rows("SELECT 1 FROM runs WHERE id = ?", (run_id,)):
                return None
    except query.NotFound:
        return None  # no store yet
    return begin_attempt(home, run_id)


__all__ = ["InvalidRun", "LineSplitter", "Supervisor", "attach_run", "check_register",
           "child_env", "exit_status", "run_command"]
