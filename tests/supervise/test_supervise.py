"""``ckptd run``: registration, fd-level output capture, exit status, liveness, sys metrics."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

from helpers import DaemonProc, ckptd, db_rows, env_for, spawn_script, wait_for

from ckptd.supervise.supervisor import LineSplitter, exit_status


def test_line_splitter_keeps_the_last_state_of_a_progress_bar() -> None:
    s = LineSplitter(limit=64)
    assert s.feed(b"plain\n") == ["plain"]
    assert s.feed(b"\r 10%|#") == []
    assert s.feed(b"\r 50%|#####\r100%|##########") == []
    assert s.feed(b"\nnext\r\n") == ["100%|##########", "next"]
    assert s.feed(b"\xff bad utf8\n") == ["\ufffd bad utf8"]
    # an endless bar never grows memory; a huge line is stored in pieces
    for i in range(1000):
        s.feed(f"\r{i:>5}".encode())
    assert len(s._buf) <= 64
    assert s.close() == ["  999"]
    assert s.feed(b"x" * 100) == ["x" * 100]
    assert s.close() == []


def test_exit_status_says_why() -> None:
    assert exit_status(0, None)["status"] == "finished"
    assert exit_status(3, None) == {"status": "failed", "exit_code": 3,
                                    "reason": "exited with status 3"}
    assert exit_status(-signal.SIGKILL, None)["status"] == "interrupted"
    assert exit_status(-signal.SIGSEGV, None)["status"] == "failed"
    stopped = exit_status(-signal.SIGTERM, signal.SIGTERM)
    assert stopped["status"] == "interrupted" and "SIGTERM" in stopped["reason"]


CHATTY = """
import os, subprocess, sys, time
import ckptd_client as ckptd

run = ckptd.init(name="ignored-the-supervisor-named-it", seed=7)
print("hello from python", flush=True)
for i in range(0, 101, 20):
    print(f"\\rtraining {i:3d}%", end="", flush=True)
print(flush=True)
os.write(1, b"raw write to fd 1\\n")
subprocess.run(["sh", "-c", "echo from a subprocess; echo subprocess error >&2"], check=True)
run.log({"loss": 0.5}, step=0)
time.sleep(0.05)
run.event("an event between the lines")
time.sleep(0.05)
print("to stderr", file=sys.stderr, flush=True)
run.finish()
sys.exit(3)
"""


def test_run_registers_captures_output_and_records_exit(home: Path, daemon: DaemonProc) -> None:
    script = home.parent / "chatty.py"
    script.write_text(textwrap.dedent(CHATTY))
    env = env_for(home, MY_API_TOKEN="hunter2", PLAIN_SETTING="visible")
    res = ckptd(home, "run", "--name", "chatty", "--", sys.executable, os.fspath(script),
                "--flag", env=env)
    assert res.returncode == 3, res.stderr
    # passed through unchanged, including bytes written by a subprocess
    assert "hello from python" in res.stdout and "from a subprocess" in res.stdout
    assert "training 100%" in res.stdout and "subprocess error" in res.stderr

    runs = db_rows(home, "SELECT id, name, status, exit_code, reason, seed FROM runs")
    assert len(runs) == 1, runs  # the script joined the supervisor's run
    run_id, name, status, code, reason, seed = runs[0]
    assert (name, status, code, seed) == ("chatty", "failed", 3, 7) and "status 3" in reason
    lines = db_rows(home, "SELECT level, message FROM events WHERE run_id = ? AND"
                          " kind = 'console' ORDER BY time, rowid", (run_id,))
    stdout = [m for lvl, m in lines if lvl == "stdout"]
    stderr = [m for lvl, m in lines if lvl == "stderr"]
    assert stdout == ["hello from python", "training 100%", "raw write to fd 1",
                      "from a subprocess"], stdout
    assert stderr == ["subprocess error", "to stderr"], stderr

    info = json.loads(ckptd(home, "show", run_id, "--json", check=True).stdout)
    assert info["command"] == [sys.executable, os.fspath(script), "--flag"]
    assert info["cwd"] == os.getcwd()
    assert info["env"]["MY_API_TOKEN"] == "***" and info["env"]["PLAIN_SETTING"] == "visible"
    assert "hunter2" not in ckptd(home, "show", run_id, check=True).stdout
    prov = info["provenance"]
    for key in ("host", "boot_id", "python", "torch", "packages_hash", "git_commit"):
        assert key in prov, key

    tail = ckptd(home, "tail", run_id, "-n", "50", check=True).stdout.splitlines()
    order = [next(i for i, ln in enumerate(tail) if text in ln)
             for text in ("from a subprocess", "an event between the lines", "to stderr")]
    assert order == sorted(order), tail  # console and events interleaved by time


def test_signals_are_recorded(home: Path, daemon: DaemonProc) -> None:
    kill_self = "import os, signal; os.kill(os.getpid(), signal.{})"
    res = ckptd(home, "run", "--name", "segv", "--", sys.executable, "-c",
                kill_self.format("SIGSEGV"))
    assert res.returncode == 128 + signal.SIGSEGV
    res = ckptd(home, "run", "--name", "oom", "--", sys.executable, "-c",
                kill_self.format("SIGKILL"))
    assert res.returncode == 128 + signal.SIGKILL
    rows = dict((r[0], r[1:]) for r in db_rows(
        home, "SELECT name, status, signal, reason FROM runs"))
    assert rows["segv"][:2] == ("failed", signal.SIGSEGV) and "SIGSEGV" in rows["segv"][2]
    assert rows["oom"][:2] == ("interrupted", signal.SIGKILL)
    res = ckptd(home, "run", "--", "/nonexistent/trainer")
    assert res.returncode == 127 and "cannot start" in res.stderr
    res = ckptd(home, "run")
    assert res.returncode != 0 and "after --" in res.stderr and "Traceback" not in res.stderr


def test_killed_supervisor_and_process_leave_the_run_interrupted(home: Path,
                                                                 daemon: DaemonProc) -> None:
    import subprocess

    # a command that never uses the client: the supervisor names its pid
    sup = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "run", "--name", "hang",
         "--", "sleep", "60"],
        env=env_for(home), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        pid = wait_for(lambda: (r := db_rows(home, "SELECT pid FROM runs")) and r[0][0],
                       timeout=30, what="registration")
        sup.kill()  # the supervisor first: the training process alone keeps it running
        sup.wait(timeout=10)
        time.sleep(2.5)  # a liveness sweep
        assert db_rows(home, "SELECT status FROM runs")[0][0] == "running"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: db_rows(home, "SELECT status FROM runs")[0][0] == "interrupted",
                 timeout=15, what="liveness to notice")
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


def test_daemon_samples_system_metrics_of_live_runs(home: Path) -> None:
    d = DaemonProc(home, env=env_for(home, CKPTD_SYS_INTERVAL="0"))
    d.start()
    try:
        proc = spawn_script(home, """
            import time, ckptd_client as ckptd
            run = ckptd.init(name="busy")
            end = time.time() + 3.0
            while time.time() < end:
                sum(range(10000))
            run.finish()
        """, stdout=open(os.devnull, "w"))  # noqa: SIM115
        proc.wait(timeout=60)
        rows = db_rows(home, "SELECT key, value FROM metrics WHERE src = 'd'")
        keys = {k for k, _ in rows}
        assert {"sys/cpu_percent", "sys/rss_bytes", "sys/threads",
                "sys/disk_free_bytes"} <= keys, keys
        assert all(v > 0 for k, v in rows if k in ("sys/rss_bytes", "sys/threads"))
        out = ckptd(home, "metrics", "busy", "--key", "sys/rss_bytes", "--format", "jsonl",
                    check=True).stdout
        assert out.strip() and json.loads(out.splitlines()[0])["value"] > 0
        # they stay out of the training curve
        assert "sys/" not in ckptd(home, "metrics", "busy", "--format", "jsonl").stdout
    finally:
        d.stop()
