"""``ckptd run`` under stress: its own death, stop signals the command ignores,
registrations the daemon would refuse. Real processes, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import DaemonProc, ckptd, db_rows, env_for, wait_for


def supervise(home: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "run", *args],
        env=env_for(home, **env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, cwd=home.parent)


def stop_supervisor(sup: subprocess.Popen[bytes]) -> None:
    """What a test started is killed when it ends, whatever happened (finally:)."""
    if sup.poll() is None:
        sup.kill()
        sup.wait()


def orphan_the_trainer(home: Path, sup: subprocess.Popen[bytes], line: str) -> int:
    """kill -9 of ``ckptd run`` once the trainer printed ``line``: the trainer's pid."""
    wait_for(lambda: ("s", line) in console(home), timeout=60, what=f"output {line!r}")
    pid = run_row(home)["pid"]
    sup.kill()
    sup.wait(timeout=10)
    return pid


def ended(home: Path, timeout: float = 30) -> dict:
    """The run's row once it is no longer running."""
    return wait_for(lambda: (r := run_row(home))["status"] != "running" and r,
                    timeout=timeout, what="the run to end")


def run_row(home: Path) -> dict:
    keys = ["id", "status", "pid", "signal", "reason", "auto_resume"]
    rows = db_rows(home, f"SELECT {', '.join(keys)} FROM runs")
    return dict(zip(keys, rows[0], strict=True)) if rows else {}


def console(home: Path) -> list[tuple[str, str]]:
    return db_rows(home, "SELECT src, message FROM events WHERE kind = 'console'"
                         " ORDER BY time, rowid")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def reap(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


TRAINER = """
import time, ckptd_client as ckptd
run = ckptd.init()
for i in range(30):
    print(f"line {i}", flush=True)
    run.log({"x": i}, step=i)
    time.sleep(0.1)
run.finish()
"""


def test_training_outlives_a_killed_supervisor(home: Path, daemon: DaemonProc) -> None:
    """kill -9 of ``ckptd run``: the command keeps printing (no EPIPE), finishes,
    and the daemon records the output printed after the supervisor died."""
    sup = supervise(home, "--", sys.executable, "-c", TRAINER)
    pid = None
    try:
        pid = orphan_the_trainer(home, sup, "line 3")
        row = ended(home, timeout=60)
        assert row["status"] == "finished", row
        wait_for(lambda: gone(pid), timeout=30, what="the trainer to exit")
        lines = console(home)
        assert ("d", "line 29") in lines, lines[-5:]  # captured by the daemon after the kill
        texts = [m for _, m in lines if m.startswith("line ")]
        assert texts == [f"line {i}" for i in range(30)], texts  # none lost, none twice
        events = [m for (m,) in db_rows(home, "SELECT message FROM events WHERE kind ="
                                              " 'event' AND src = 'd'")]
        assert any("supervisor of attempt 1 went away" in m for m in events), events
    finally:
        stop_supervisor(sup)
        if pid:
            reap(pid)


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    " signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"])
print("ready", child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_command_that_ignores_a_stop_is_killed_after_the_grace_period(
        home: Path, daemon: DaemonProc, sig: signal.Signals) -> None:
    # the option, and the variable that supervisors ckptd starts itself read
    grace = ["--stop-grace", "1"] if sig == signal.SIGINT else []
    sup = supervise(home, "--auto-resume", *grace, "--", sys.executable, "-c", STUBBORN,
                    CKPTD_STOP_GRACE="1" if not grace else "30")
    pids: list[int] = []
    try:
        ready = wait_for(lambda: [m for _, m in console(home) if m.startswith("ready")],
                         timeout=60, what="the command to start")
        pids = [run_row(home)["pid"], int(ready[0].split()[1])]
        t0 = time.monotonic()
        sup.send_signal(sig)  # to the supervisor alone, not its group
        assert sup.wait(timeout=30) == 128 + signal.SIGKILL
        took = time.monotonic() - t0
        assert 0.9 < took < 15, took
        for pid in pids:  # the command and its child: the whole process group
            wait_for(lambda pid=pid: gone(pid), timeout=10, what="the process group to die")
        row = ended(home)
        assert row["status"] == "interrupted" and row["signal"] == signal.SIGKILL, row
        assert row["auto_resume"] == 0 and sig.name in row["reason"], row
        (att_sig,), = db_rows(home, "SELECT signal FROM attempts WHERE attempt = 1")
        assert att_sig == signal.SIGKILL
        events = [m for (m,) in db_rows(home, "SELECT message FROM events WHERE kind = 'event'")]
        assert any("sending SIGKILL to its process group" in m for m in events), events
    finally:
        stop_supervisor(sup)
        reap(*pids)


def test_a_stop_signal_sent_to_the_command_itself_sticks(home: Path) -> None:
    """SIGTERM to the training process (not to ``ckptd run``) is a person's stop too."""
    d = DaemonProc(home, env=env_for(home, CKPTD_RESTART_BACKOFF="0"))
    d.start()
    sup = supervise(home, "--auto-resume", "--", sys.executable, "-c",
                    "import time, ckptd_client as c; c.init(); print('up', flush=True);"
                    " time.sleep(60)")
    try:
        wait_for(lambda: run_row(home).get("pid"), timeout=60, what="registration")
        wait_for(lambda: ("s", "up") in console(home), timeout=60, what="start")
        os.kill(run_row(home)["pid"], signal.SIGTERM)
        sup.wait(timeout=30)
        row = ended(home)
        assert row["status"] == "interrupted" and row["auto_resume"] == 0, row
        time.sleep(2.5)  # a sweep: not relaunched
        (attempt,), = db_rows(home, "SELECT attempt FROM runs")
        assert attempt == 1
    finally:
        stop_supervisor(sup)
        d.stop()


def test_a_name_the_daemon_would_refuse_is_refused_before_launching(
        home: Path, daemon: DaemonProc) -> None:
    marker = home.parent / "started"
    res = ckptd(home, "run", "--name", "n" * 5000, "--", sys.executable, "-c",
                f"open({os.fspath(marker)!r}, 'w')")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "--name" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert not marker.exists()
    assert json.loads(ckptd(home, "ls", "--json", check=True).stdout) == []


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                 signal.SIGKILL])
def test_stopping_an_orphaned_trainer_sticks(home: Path, sig: signal.Signals) -> None:
    """``kill -9`` of ``ckptd run``, then the person kills the trainer too: auto-resume
    must not relaunch what they are trying to stop."""
    d = DaemonProc(home, env=env_for(home, CKPTD_RESTART_BACKOFF="0"))
    d.start()
    sup = supervise(home, "--auto-resume", "--", sys.executable, "-c",
                    "import time, ckptd_client as c; c.init(); print('up', flush=True);"
                    " time.sleep(60)")
    pid = None
    try:
        pid = orphan_the_trainer(home, sup, "up")
        time.sleep(2.5)  # a sweep: the orphan runs on
        assert run_row(home)["status"] == "running"
        os.kill(pid, sig)
        row = ended(home)
        assert row["status"] == "interrupted" and row["auto_resume"] == 0, row
        time.sleep(4.5)  # two sweeps: nothing relaunches it
        (attempt,), = db_rows(home, "SELECT attempt FROM runs")
        assert attempt == 1
    finally:
        stop_supervisor(sup)
        if pid:
            reap(pid)
        d.stop()
