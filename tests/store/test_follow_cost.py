"""``ckptd tail -f`` stays cheap, and a garbage store is named as such.

Issue 8.16: following an idle run took ~30% of a core while another run
logged, because every write to the WAL woke it for a fresh query. Now a
follower looks at most LOOKS_PER_SECOND times a second, and only runs its
queries when the store changed (``PRAGMA data_version``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from helpers import DaemonProc, ckptd, env_for, spawn_script, wait_for

#: Logs steadily (small commits, many WAL writes) until told to stop.
BUSY = """
import os, time
import ckptd_client as ckptd
run = ckptd.init(name="busy")
step = 0
while not os.path.exists(os.environ["STOP_FILE"]):
    for _ in range(20):
        run.log({"loss": 1.0 / (step + 1)}, step=step)
        step += 1
    time.sleep(0.002)
run.finish(timeout=60)
print("steps", step, flush=True)
"""
WINDOW = 6.0
#: CPU seconds the follower of an idle run may use over WINDOW (~8% of a core;
#: generous for a shared box, the old follower used several times that).
CPU_BOUND = 0.5


def test_tail_f_of_an_idle_run_is_cheap_while_another_run_logs(home: Path,
                                                               daemon: DaemonProc) -> None:
    stop = home.parent / "stop-busy"
    # a live run that logs nothing (tail -f of an ended run prints and exits)
    idle_proc = spawn_script(home, """
import os, time
import ckptd_client as ckptd
run = ckptd.init(name="idle")
run.event("hello from the idle run")
run.flush()
print(run.id, flush=True)
while not os.path.exists(os.environ["STOP_FILE"]):
    time.sleep(0.05)
run.finish()
""", env=env_for(home, STOP_FILE=os.fspath(stop)))
    assert idle_proc.stdout is not None
    idle = idle_proc.stdout.readline().split()[-1]
    busy = spawn_script(home, BUSY, env=env_for(home, STOP_FILE=os.fspath(stop)))
    tail = subprocess.Popen([sys.executable, "-m", "ckptd", "--home", os.fspath(home), "tail",
                             "-f", idle], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env_for(home), stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: ckptd(home, "ls").stdout.count("busy") >= 1, what="busy run")
        time.sleep(2.0)  # tail -f's start-up (imports, first query) is not the point
        proc = psutil.Process(tail.pid)
        before = proc.cpu_times()
        time.sleep(WINDOW)
        after = proc.cpu_times()
        used = (after.user - before.user) + (after.system - before.system)
        print(f"tail -f of an idle run: {used:.3f} s CPU in {WINDOW:.0f} s "
              f"({100 * used / WINDOW:.1f}% of a core) while another run logged")
        assert tail.poll() is None, tail.stderr.read() if tail.stderr else ""
        assert used < CPU_BOUND, used
    finally:
        stop.touch()
        busy.communicate(timeout=120)
        idle_proc.communicate(timeout=60)
        tail.terminate()
        tail.communicate(timeout=30)


def test_tail_f_still_shows_new_lines_promptly(home: Path, daemon: DaemonProc) -> None:
    """Cheap, not deaf: a new line appears within a second."""
    stop = home.parent / "stop-busy"
    proc = spawn_script(home, """
import os, sys, time
import ckptd_client as ckptd
run = ckptd.init(name="chatty")
print(run.id, flush=True)
while not os.path.exists(os.environ["STOP_FILE"]):
    time.sleep(0.05)
run.event("the line to see")
run.flush()
run.finish()
""", env=env_for(home, STOP_FILE=os.fspath(stop)))
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    tail = subprocess.Popen([sys.executable, "-m", "ckptd", "--home", os.fspath(home), "tail",
                             "-f", run_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env_for(home), stdin=subprocess.DEVNULL, text=True)
    try:
        time.sleep(2.0)
        stop.touch()
        proc.communicate(timeout=60)
        t0 = time.monotonic()
        assert tail.stdout is not None
        while "the line to see" not in tail.stdout.readline():
            pass
        assert time.monotonic() - t0 < 1.5
    finally:
        tail.terminate()
        tail.communicate(timeout=30)


GARBAGE_HINT = "not a ckptd store"


def test_garbage_store_gets_one_line_from_cli_and_daemon(home: Path) -> None:
    (home / "ckptd.db").write_bytes(os.urandom(64 << 10))
    out = ckptd(home, "ls")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert GARBAGE_HINT in lines[0] and "move it aside" in lines[0], lines[0]
    proc = subprocess.run([sys.executable, "-m", "ckptd", "--home", os.fspath(home), "daemon"],
                          capture_output=True, text=True, timeout=60, env=env_for(home),
                          stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if "ckptd:" in ln or "Error" in ln]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and GARBAGE_HINT in errors[0] and "move it aside" in errors[0], \
        proc.stderr
