"""Helpers shared by the tests: real daemon processes, scripts, store reads."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def socket_path(home: Path) -> Path:
    from ckptd_client import paths

    return paths.socket_path(home)


def wait_for(pred: Any, timeout: float = 15.0, interval: float = 0.02, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(interval)


def socket_answers(home: Path) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(os.fspath(socket_path(home)))
        return True
    except OSError:
        return False
    finally:
        s.close()


def env_for(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a process the test starts for ``home``.

    ``XDG_RUNTIME_DIR`` is kept as the test process has it (the ``home``
    fixture removes it, module fixtures may not): the child must pick the
    same socket the test process looks for (every SSH login sets it).
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("CKPTD_RUN_ID", "CKPTD_ATTEMPT", "CKPTD_SOCKET")}
    env["CKPTD_HOME"] = os.fspath(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class DaemonProc:
    """A daemon started by the test itself, so it can be SIGKILLed and restarted."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = env or env_for(home)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        log = open(self.home / "daemon.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckptd.daemon", "--home", os.fspath(self.home)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
            start_new_session=True,
        )
        log.close()
        if wait:
            try:
                wait_for(lambda: socket_answers(self.home), what="daemon socket")
            except BaseException:
                self.stop()  # a failed fixture still stops what it started
                raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def restart(self) -> None:
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        kill_home_daemon(self.home)


def kill_home_processes(home: Path) -> list[int]:
    """SIGKILL every process working on ``home`` that a test left behind: trainers
    an auto-resume relaunched, supervisors, torchrun workers, daemons they
    auto-started. Found by ``CKPTD_HOME`` in their environment or ``home`` on
    their command line; the test process itself is spared."""

    return kill_processes_under(home, exact=True)


def kill_processes_under(root: Path, exact: bool = False) -> list[int]:
    """SIGKILL every process whose ``CKPTD_HOME`` or command-line argument is
    ``root`` (``exact``) or lies below it; the test process itself is spared."""
    import psutil

    target, killed = os.fspath(root), []

    def hit(value: str | None) -> bool:
        return bool(value) and (value == target or (not exact and value.startswith(
            target + os.sep)))

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            mine = any(hit(a) for a in (proc.info["cmdline"] or [])) or \
                hit(proc.environ().get("CKPTD_HOME"))
            if mine:
                proc.kill()
                killed.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    for pid in killed:  # reap our own children among them
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return killed


def kill_home_daemon(home: Path) -> None:
    """Stop whatever daemon holds ``home``'s lock (e.g. one auto-started by a client)."""
    lock = home / "daemon.lock"
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            # a daemon this process auto-started is our child: reap it, or
            # its zombie would look alive until the deadline
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


def run_script(home: Path, code: str, *, timeout: float = 120, check: bool = True,
               env: dict[str, str] | None = None, cwd: Path | None = None,
               args: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet as a separate training process."""
    script = home.parent / f"script_{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.run([sys.executable, os.fspath(script), *(args or [])],
                          capture_output=True, text=True, timeout=timeout,
                          env=env or env_for(home), cwd=cwd or home.parent,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def home_with_runs(parent: Path, code: str, *, args: list[str] | None = None) -> Path:
    """A fresh home under ``parent`` whose runs the training snippet ``code`` wrote,
    with its daemon stopped again: what the read-only commands (ls, show, compare,
    export) see after a day's work."""
    home = parent / "home"
    home.mkdir(mode=0o700)
    d = DaemonProc(home)
    d.start()
    try:
        run_script(home, code, args=args)
    finally:
        d.stop()
    return home


def spawn_script(home: Path, code: str, *, env: dict[str, str] | None = None,
                 stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    script = home.parent / f"script_{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.Popen([sys.executable, os.fspath(script)], stdout=stdout,
                            stderr=subprocess.PIPE, text=True, env=env or env_for(home),
                            cwd=home.parent, stdin=subprocess.DEVNULL)


def ckptd(home: Path, *args: str, timeout: float = 60, check: bool = False,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``ckptd`` command line."""
    proc = subprocess.run([sys.executable, "-m", "ckptd", "--home", os.fspath(home), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=env or env_for(home), stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"ckptd {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def db_rows(home: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{home / 'ckptd.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


#: Joins a run as a new attempt and restores, as ``ckptd resume`` would; prints
#: "restored <step> whole|TORN" (the state's "w" is filled with its step) or
#: "restored none". Shared by the crash-point and power-loss suites.
RESTORE_SCRIPT = """
import ckptd_client as ckptd
run = ckptd.init()
state = run.restore()
if state is None:
    print("restored none")
else:
    whole = bool((state["w"] == float(state["step"])).all())
    print("restored", state["step"], "whole" if whole else "TORN", flush=True)
run.finish(timeout=30)
"""


def two_checkpoints_newest_flipped(home: Path, name: str, offset: int) -> str:
    """A run with checkpoints at steps 10 and 20, one bit of step 20's data
    flipped at ``offset``; returns the run id (restore must fall back to 10)."""
    run_id = run_script(home, f"""
import torch, ckptd_client as ckptd
run = ckptd.init(name={name!r})
for step in (10, 20):
    run.checkpoint({{"w": torch.full((1000,), float(step)), "step": step}}, step=step).wait(30)
print(run.id)
run.finish()
""").stdout.split()[-1]
    data = home / "runs" / run_id / "checkpoints" / "step-20" / "tensors.bin"
    with open(data, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    return run_id


def damage_file(path: Path, how: str) -> None:
    """The damage a crash or a disk does to a checkpoint's data file: ``flip`` one
    bit in its second 64 MiB chunk, ``torn`` a 4 KiB page that never reached the
    disk, ``truncated`` the last byte gone."""
    with open(path, "r+b") as f:
        if how == "flip":
            f.seek(70 << 20)
            b = f.read(1)
            f.seek(70 << 20)
            f.write(bytes([b[0] ^ 0x01]))
        elif how == "torn":
            f.seek(4096 * 7)
            f.write(bytes(4096))
        elif how == "truncated":
            f.truncate(os.path.getsize(path) - 1)
        else:
            raise ValueError(how)
