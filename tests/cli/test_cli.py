"""The ``ckptd`` command line as a user meets it: real subprocesses, real store.

User errors must be one line on stderr and a non-zero exit, never a traceback;
machine-readable output keeps the shapes of SPEC section 5; reading commands
never need (or start) a daemon; ``tail -f`` follows within a second and ends
quietly on Ctrl-C and on a closed pipe.
"""

from __future__ import annotations

import json
import os
import pty
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ckptd_client import paths
from helpers import (
    DaemonProc,
    ckptd,
    env_for,
    home_with_runs,
    kill_home_daemon,
    run_script,
    spawn_script,
)

RUNS = """
    import ckptd_client as ckptd
    with ckptd.init(project="cli", name="alpha", config={"lr": 0.1}) as run:
        for step in range(5):
            run.log({"loss": 1.0 / (step + 1), "acc": step * 0.1}, step=step)
            run.event(f"epoch {step} done", level="warning" if step == 4 else "info")
    try:
        with ckptd.init(project="cli", name="beta") as run:
            run.log({"loss": 9.0}, step=0)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
"""


@pytest.fixture(scope="module")
def store_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home with two finished runs ("alpha" finished, "beta" failed) and no daemon."""
    home = home_with_runs(tmp_path_factory.mktemp("cli"), RUNS)
    assert not paths.socket_path(home).exists()
    yield home
    assert not paths.socket_path(home).exists(), "a reading command started a daemon"


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_unknown_run_is_one_line_and_exit_2(store_home: Path) -> None:
    for args in (["show", "nope"], ["metrics", "nope"], ["tail", "nope"]):
        proc = ckptd(store_home, *args)
        one_line_error(proc, "'nope'", "ckptd ls")
        assert proc.returncode == 2


def test_ambiguous_prefix_is_one_line_and_exit_2(store_home: Path) -> None:
    proc = ckptd(store_home, "show", "20")  # both run ids start with the year
    one_line_error(proc, "ambiguous")
    assert proc.returncode == 2


def test_bad_options_are_one_line(store_home: Path) -> None:
    one_line_error(ckptd(store_home, "metrics", "alpha", "--format", "xml"), "--format")
    one_line_error(ckptd(store_home, "tail", "alpha", "--grep", "("), "--grep")
    one_line_error(ckptd(store_home, "ls", "--status", "sleeping"), "sleeping")


def test_no_store_yet(tmp_path: Path) -> None:
    home = tmp_path / "empty"
    proc = ckptd(home, "ls")
    assert proc.returncode == 0 and proc.stdout.strip() == "no runs yet"
    assert ckptd(home, "ls", "--json").stdout.strip() == "[]"
    one_line_error(ckptd(home, "show", "x"), "no ckptd store")
    assert not (home / paths.DB_NAME).exists()


def test_json_shapes(store_home: Path) -> None:
    runs = json.loads(ckptd(store_home, "ls", "--json", check=True).stdout)
    assert [(r["name"], r["status"]) for r in runs] == [("alpha", "finished"), ("beta", "failed")]
    ls_keys = {"id", "name", "status", "attempt", "step", "started", "ended"}
    assert all(ls_keys <= set(r) for r in runs)
    assert runs[0]["step"] == 4 and runs[0]["attempt"] == 1
    failed = json.loads(ckptd(store_home, "ls", "--status", "failed", "--json").stdout)
    assert [r["name"] for r in failed] == ["beta"]

    show = json.loads(ckptd(store_home, "show", runs[1]["id"][:-2], "--json", check=True).stdout)
    assert ls_keys | {"command", "cwd", "provenance", "checkpoints"} <= set(show)
    assert show["name"] == "beta" and "RuntimeError: boom" in show["traceback"]
    assert show["command"][0] == sys.executable and show["checkpoints"] == []

    status = ckptd(store_home, "status", "--json")
    assert status.returncode == 3
    info = json.loads(status.stdout)
    assert set(info) == {"running", "pid", "home", "socket", "version"}
    assert info["running"] is False and info["home"] == os.fspath(store_home)


def test_metrics_formats(store_home: Path) -> None:
    rows = [json.loads(line) for line in
            ckptd(store_home, "metrics", "alpha", "--format", "jsonl", check=True).stdout.split()]
    assert all(set(r) == {"step", "key", "value", "attempt", "time"} for r in rows)
    assert [(r["step"], r["key"], r["value"]) for r in rows if r["key"] == "loss"] == \
        [(s, "loss", 1.0 / (s + 1)) for s in range(5)]
    csv = ckptd(store_home, "metrics", "alpha", "--key", "acc", "--format", "csv").stdout
    lines = csv.strip().splitlines()
    assert lines[0].split(",")[:3] == ["step", "key", "value"] and len(lines) == 6
    table = ckptd(store_home, "metrics", "alpha").stdout.splitlines()
    assert table[0].split() == ["STEP", "ACC", "LOSS"] and len(table) == 6


def test_tail_last_lines_grep_and_metrics(store_home: Path) -> None:
    out = ckptd(store_home, "tail", "alpha", "-n", "2", check=True).stdout.splitlines()
    assert len(out) == 2 and "epoch 4 done" in out[0] and "finished" in out[1]
    assert "WARNING" in out[0]
    out = ckptd(store_home, "tail", "alpha", "--grep", "epoch [13]").stdout.splitlines()
    assert [line.split()[-2] for line in out] == ["1", "3"]
    out = ckptd(store_home, "tail", "alpha", "--metrics", "-n", "50").stdout
    assert "step 4  loss=0.2  acc=0.4" in out
    assert "\x1b[" not in out  # not a TTY: no colour


def test_colour_only_on_a_tty_and_never_with_no_color(store_home: Path) -> None:
    def on_tty(**extra: str) -> bytes:
        main, sub = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "ckptd", "--home", os.fspath(store_home),
                                 "tail", "alpha", "--metrics"], stdout=sub, stderr=sub,
                                stdin=subprocess.DEVNULL, env=env_for(store_home, **extra))
        os.close(sub)
        out = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        os.close(main)
        assert proc.wait(timeout=30) == 0, out
        return out

    assert b"\x1b[36m" in on_tty(TERM="xterm")
    plain = on_tty(TERM="xterm", NO_COLOR="1")
    assert b"\x1b[" not in plain and b"loss=" in plain


LIVE = """
    import os, time
    import ckptd_client as ckptd
    go, done = os.environ["GO_FILE"], os.environ["DONE_FILE"]
    with ckptd.init(name="live") as run:
        for i in range(3):
            run.event(f"warm-up {i}")
        run.flush()
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.01)
        run.event("marker")
        run.flush()
        print(f"committed {time.time()!r}", flush=True)
        while not os.path.exists(done):
            time.sleep(0.01)
"""


class Lines:
    """A process's stdout, line by line, with a timeout (a thread does the blocking reads;
    ``select`` on the pipe would miss lines already in Python's buffer)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stream = proc.stdout
        threading.Thread(target=lambda: [self.queue.put(line) for line in stream],
                         daemon=True).start()

    def next(self, timeout: float) -> str:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line on stdout within {timeout} s") from None


def test_tail_follow_sees_new_event_within_a_second_and_ends_quietly(
        daemon: DaemonProc, home: Path) -> None:
    go, done = home.parent / "go", home.parent / "done"
    trainer = spawn_script(home, LIVE, env=env_for(home, GO_FILE=os.fspath(go),
                                                   DONE_FILE=os.fspath(done)))
    try:
        trainer_out = Lines(trainer)
        assert trainer_out.next(30).strip() == "ready"
        tail = subprocess.Popen([sys.executable, "-m", "ckptd", "--home", os.fspath(home),
                                 "tail", "-f", "live"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                env=env_for(home))
        tail_out = Lines(tail)
        try:
            first = [tail_out.next(30) for _ in range(3)]
            assert all("warm-up" in line for line in first)
            go.touch()
            committed = float(trainer_out.next(30).split()[1])
            line = tail_out.next(10)
            seen = time.time()
            assert "marker" in line
            assert seen - committed < 1.0, f"tail -f took {seen - committed:.2f} s"
            # Ctrl-C: exit 0, no traceback
            tail.send_signal(signal.SIGINT)
            _, err = tail.communicate(timeout=15)
            assert tail.returncode == 0 and "Traceback" not in err, err
        finally:
            if tail.poll() is None:
                tail.kill()
                tail.communicate()
    finally:
        done.touch()
        trainer.communicate(timeout=30)
    assert trainer.returncode == 0

    # the run is now quiet (finished): `| head -3` must still end tail -f, cleanly
    cmd = (f"{sys.executable} -m ckptd --home {home} tail -f live | head -3;"
           " echo \"tail-exit=${PIPESTATUS[0]}\" >&2")
    start = time.monotonic()
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30,
                          env=env_for(home), stdin=subprocess.DEVNULL)
    assert len(proc.stdout.splitlines()) == 3
    assert "tail-exit=0" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert time.monotonic() - start < 25


def daemon_pids(home: Path) -> list[int]:
    """Live ``ckptd.daemon`` processes serving ``home`` (found by command line)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if "ckptd.daemon" in cmd and os.fspath(home) in cmd:
            found.append(p.info["pid"])
    return found


def lock_is_free(home: Path) -> bool:
    """Nobody holds the home's daemon lock (the flock a running daemon keeps)."""
    import fcntl

    try:
        fd = os.open(home / "daemon.lock", os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_reading_commands_do_not_start_a_daemon(store_home: Path) -> None:
    for args in (["ls"], ["show", "alpha"], ["tail", "alpha"], ["metrics", "alpha"]):
        ckptd(store_home, *args, check=True)
    # a daemon started in the background needs a moment to take its lock and
    # bind: look after a pause, at the lock and the processes, not only the socket
    time.sleep(3.0)
    started, free = daemon_pids(store_home), lock_is_free(store_home)
    if started or not free:
        kill_home_daemon(store_home)  # fail without leaving it running
    assert not started, f"a reading command started a daemon: pids {started}"
    assert free, "someone holds the daemon lock"
    assert not paths.socket_path(store_home).exists()


def test_closed_pipe_ends_every_command_quietly_with_0(daemon: DaemonProc, home: Path) -> None:
    """`ckptd metrics RUN | head -1`: output larger than the pipe, the reader gone early."""
    run_script(home, """
        import ckptd_client as ckptd
        with ckptd.init(name="long") as run:
            for step in range(3000):
                run.log({"loss": 1.0 / (step + 1), "lr": 0.1, "acc": 0.5}, step=step)
            run.flush()
    """)
    env = env_for(home)
    env.pop("PYTHONUNBUFFERED")  # buffered stdout, as in a user's shell
    for args in ("metrics long --format jsonl", "metrics long", "metrics long --format csv",
                 "tail long --metrics -n 3000"):
        cmd = (f"{sys.executable} -m ckptd --home {home} {args} | head -1 >/dev/null;"
               " echo \"exit=${PIPESTATUS[0]}\" >&2")
        proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60,
                              env=env, stdin=subprocess.DEVNULL)
        assert proc.stderr.strip() == "exit=0", (args, proc.stderr)
