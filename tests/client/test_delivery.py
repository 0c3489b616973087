"""Promise 1 end to end: nothing a ``log()`` call acknowledged is lost, nothing is doubled.

Every test here runs the real parts: a daemon process, a training process that
logs through the real client, real SQLite, real ``kill -9``. The training
scripts record each step only after ``log()`` returned, written to a file
opened unbuffered (``os.write``), so that record survives the kill and tells
the test exactly which events the client had acknowledged.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from pathlib import Path

import pytest
from ckptd_client import paths, protocol
from helpers import DaemonProc, db_rows, env_for, spawn_script, wait_for

#: A training process in a tight loop. ``METRICS`` keys per step (many keys
#: fill the socket buffer sooner, which exercises partial sends and the spool).
TRAINER = """
import os, sys
import ckptd_client as ckptd

out = os.open(sys.argv[1] if len(sys.argv) > 1 else os.environ["PROGRESS"],
              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
stop_file = os.environ.get("STOP_FILE")
width = int(os.environ.get("METRICS", "2"))
run = ckptd.init(name=os.environ.get("RUN_NAME", "victim"))
os.write(out, f"run {run.id}\\n".encode())
step = 0
while stop_file is None or not os.path.exists(stop_file):
    values = {"x": float(step), **{f"k{i}": step * 0.5 + i for i in range(width - 1)}}
    run.log(values, step=step)
    os.write(out, b"%d\\n" % step)  # only after log() returned
    step += 1
    if stop_file and step % 50 == 0:
        import time; time.sleep(0.002)  # a real loop does work between steps
run.flush()
os.write(out, b"flushed\\n")
run.finish()
"""


def progress(path: Path) -> tuple[str | None, list[int], bool]:
    """Run id, steps whose log() returned, and whether flush() returned."""
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        return None, [], False
    run_id, steps, flushed = None, [], False
    for line in text.split("\n")[:-1]:  # the last element is an unfinished line or ""
        if line.startswith("run "):
            run_id = line[4:]
        elif line == "flushed":
            flushed = True
        elif line:
            steps.append(int(line))
    return run_id, steps, flushed


def stored_steps(home: Path, run_id: str) -> list[tuple[int, int]]:
    """(step, number of rows) of metric ``x``, one per logged step if nothing doubled."""
    return db_rows(home, "SELECT step, COUNT(*) FROM metrics WHERE run_id = ? AND key = 'x'"
                   " GROUP BY step ORDER BY step", (run_id,))


def assert_all_once(home: Path, run_id: str, steps: list[int], timeout: float = 60) -> None:
    """Every step in ``steps`` reaches the store (waiting for spool ingestion), exactly once."""
    expected = set(steps)

    def arrived() -> bool:
        return expected <= {s for s, _ in stored_steps(home, run_id)}

    wait_for(arrived, timeout=timeout, what=f"{len(expected)} acknowledged steps in the store")
    rows = stored_steps(home, run_id)
    doubled = [s for s, n in rows if n != 1]
    assert not doubled, f"steps stored more than once: {doubled[:10]}"
    # nothing beyond the one step whose log() may have returned unrecorded
    assert max(s for s, _ in rows) <= max(expected) + 1
    assert [s for s, _ in rows] == list(range(len(rows))), "a hole in the stored steps"
    # every metric of a stored step is there, never half an event
    widths = db_rows(home, "SELECT COUNT(*) FROM metrics WHERE run_id = ? GROUP BY seq",
                     (run_id,))
    assert len({n for (n,) in widths}) == 1


@pytest.mark.parametrize("width,stall", [(2, False), (64, False), (2, True)],
                         ids=["2-metrics", "64-metrics", "daemon-stalled"])
def test_kill9_trainer_loses_no_acknowledged_event(daemon: DaemonProc, home: Path,
                                                   long_mode: bool, width: int,
                                                   stall: bool) -> None:
    """kill -9 at a random moment of a tight log() loop: every returned log() is stored once.

    ``daemon-stalled`` stops the daemon (SIGSTOP) while the trainer logs, so the
    socket buffer fills and log() spills to the spool before the kill; the daemon
    then resumes and must take both the socket's backlog and the spool.
    """
    rng = random.Random(1000 + width + stall)
    trials = 6 if long_mode else 2
    spool = home / paths.SPOOL_DIR
    for trial in range(trials):
        prog = home.parent / f"progress-{width}-{stall}-{trial}"
        env = env_for(home, PROGRESS=os.fspath(prog), METRICS=str(width),
                      RUN_NAME=f"victim-{width}-{trial}")
        proc = spawn_script(home, TRAINER, env=env, stdout=None)
        # a random moment, counted in steps: the loop runs far faster than SQLite
        # takes 64 values a step, and the test must wait for the backlog to commit
        kill_after = rng.randint(20, 4000 if width == 2 else 1500)
        try:
            if stall:
                wait_for(lambda p=prog: len(progress(p)[1]) >= 20, timeout=30,
                         what="trainer logging")
                daemon.proc.send_signal(signal.SIGSTOP)
                wait_for(lambda: list(spool.glob("*.spool")), timeout=30,
                         what="log() spilling to the spool")
                kill_after += len(progress(prog)[1])
            wait_for(lambda p=prog, k=kill_after: len(progress(p)[1]) >= k, timeout=30,
                     interval=0.001, what="trainer logging")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            daemon.proc.send_signal(signal.SIGCONT)
        assert proc.returncode == -signal.SIGKILL
        run_id, steps, _ = progress(prog)
        assert run_id is not None and steps == list(range(len(steps)))
        assert_all_once(home, run_id, steps)
        assert daemon.proc is not None and daemon.proc.poll() is None
        wait_for(lambda: not list(spool.glob("*.spool")), timeout=30,
                 what="spool files ingested and deleted")


def test_kill9_daemon_then_new_daemon_flush_has_everything_once(home: Path) -> None:
    """The daemon dies under a logging client; a new one comes; after flush() all is there once."""
    d = DaemonProc(home)
    d.start()
    try:
        prog, stop = home.parent / "progress", home.parent / "stop"
        # no auto-start: the test decides when the new daemon appears
        env = env_for(home, PROGRESS=os.fspath(prog), STOP_FILE=os.fspath(stop),
                      CKPTD_NO_AUTOSTART="1")
        proc = spawn_script(home, TRAINER, env=env, stdout=None)
        wait_for(lambda: len(progress(prog)[1]) > 300, timeout=30, what="trainer logging")
        d.kill9()
        killed_at = len(progress(prog)[1])
        # the client keeps logging with no daemon at all (spool)
        wait_for(lambda: len(progress(prog)[1]) > killed_at + 300, timeout=30,
                 what="logging while the daemon is dead")
        d.start()
        restarted_at = len(progress(prog)[1])
        run_id = progress(prog)[0]
        assert run_id is not None
        # the client reconnects by itself: steps logged after the restart get committed
        wait_for(lambda: any(s > restarted_at for s, _ in stored_steps(home, run_id)),
                 timeout=20, what="the client reconnecting to the new daemon")
        stop.touch()
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
        run_id, steps, flushed = progress(prog)
        assert flushed
        # flush() returned: no waiting, everything is committed now
        rows = stored_steps(home, run_id)
        assert [s for s, _ in rows] == steps
        assert all(n == 1 for _, n in rows)
        assert db_rows(home, "SELECT status FROM runs WHERE id = ?", (run_id,)) == [("finished",)]
    finally:
        d.stop()


def test_no_daemon_for_the_whole_run_spools_then_ingests(home: Path) -> None:
    """CKPTD_NO_AUTOSTART and no daemon: events wait in the spool; a daemon ingests them."""
    prog = home.parent / "progress"
    code = """
        import os, sys
        import ckptd_client as ckptd
        out = os.open(os.environ["PROGRESS"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        with ckptd.init(project="p", name="offline", config={"lr": 0.1}, seed=3) as run:
            os.write(out, f"run {run.id}\\n".encode())
            for step in range(500):
                run.log({"x": float(step), "y": step}, step=step)
                os.write(out, b"%d\\n" % step)
            run.event("offline done", level="warning", n=500)
            run.flush()
            os.write(out, b"flushed\\n")
    """
    proc = spawn_script(home, code, env=env_for(home, PROGRESS=os.fspath(prog),
                                                CKPTD_NO_AUTOSTART="1"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    run_id, steps, flushed = progress(prog)
    assert run_id and flushed and steps == list(range(500))
    assert not (home / paths.DB_NAME).exists(), "nothing may have started a daemon"
    assert list((home / paths.SPOOL_DIR).glob("*.spool")), "events must be in the spool"

    d = DaemonProc(home)
    d.start()
    try:
        assert_all_once(home, run_id, steps)
        wait_for(lambda: not list((home / paths.SPOOL_DIR).glob("*.spool")), timeout=10,
                 what="spool files deleted after ingestion")
        [(name, project, status, command, cwd, config, seed)] = db_rows(
            home, "SELECT name, project, status, command, cwd, config, seed FROM runs"
            " WHERE id = ?", (run_id,))
        assert (name, project, status, seed) == ("offline", "p", "finished", 3)
        assert command and cwd and '"lr"' in config
        assert db_rows(home, "SELECT level, message FROM events WHERE run_id = ? AND"
                       " kind = 'event'", (run_id,)) == [("warning", "offline done")]
    finally:
        d.stop()


def _raw_log_frames(first_seq: int, n: int) -> bytes:
    return b"".join(protocol.encode({"t": protocol.LOG, "seq": s, "step": s, "time": 1.0e9,
                                     "m": {"x": float(s)}})
                    for s in range(first_seq, first_seq + n))


def _read_until(sock: socket.socket, reader: protocol.FrameReader, pred, timeout: float = 20):
    deadline = time.monotonic() + timeout
    got: list[dict] = []
    while not any(pred(m) for m in got):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except OSError:  # timeout, or ECONNRESET when the daemon left unread frames
            break
        if not data:
            break
        got.extend(reader.feed(data))
    return got


def test_resent_events_are_stored_once(daemon: DaemonProc, home: Path) -> None:
    """The same (run, attempt, seq) sent twice, on two connections, gives one row each."""
    frames = _raw_log_frames(1, 50)
    for _ in range(2):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.fspath(paths.socket_path(home)))
        s.sendall(protocol.encode({"t": protocol.HELLO, "run": "resend", "attempt": 1,
                                   "src": "c"}) + frames + frames
                  + protocol.encode({"t": protocol.FLUSH, "seq": 50}))
        got = _read_until(s, protocol.FrameReader(), lambda m: m["t"] == protocol.FLUSHED)
        s.close()
        assert any(m["t"] == protocol.FLUSHED for m in got), got
    assert stored_steps(home, "resend") == [(s, 1) for s in range(1, 51)]
    assert db_rows(home, "SELECT step FROM runs WHERE id = 'resend'") == [(50,)]


def test_sigterm_commits_what_was_queued_and_exits_0(daemon: DaemonProc, home: Path) -> None:
    """SIGTERM mid-stream: exit 0, and every frame handed over before it is committed."""
    n = 20_000
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.fspath(paths.socket_path(home)))
    s.sendall(protocol.encode({"t": protocol.HELLO, "run": "term", "attempt": 1, "src": "c"})
              + _raw_log_frames(1, n))
    reader = protocol.FrameReader()
    acks = _read_until(s, reader, lambda m: m["t"] == protocol.ACK)
    assert daemon.terminate() == 0
    # collect the acks sent while draining, until the daemon closes the connection
    acks += _read_until(s, reader, lambda m: False, timeout=10)
    s.close()
    max_ack = max(m["seq"] for m in acks if m["t"] == protocol.ACK)
    seqs = [r[0] for r in db_rows(home, "SELECT seq FROM metrics WHERE run_id = 'term'"
                                  " ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1)), "a queued event was dropped"
    assert len(seqs) >= max_ack
    # sendall() returned before SIGTERM: every frame was in the daemon or the kernel
    assert len(seqs) == n
    assert "Traceback" not in (home / paths.DAEMON_LOG).read_text()


def test_sigterm_commits_what_a_dead_trainer_left_in_the_kernel(daemon: DaemonProc,
                                                                 home: Path) -> None:
    """A trainer handed frames to the kernel (log() returned) and died; the daemon, busy,
    had not read them yet when SIGTERM came. Nobody can resend them: shutdown must read
    and commit them before exiting."""
    n = 20_000  # several reads' worth
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.settimeout(10)
    s.connect(os.fspath(paths.socket_path(home)))
    s.sendall(protocol.encode({"t": protocol.HELLO, "run": "orphan", "attempt": 1, "src": "c"})
              + protocol.encode({"t": protocol.PING}))
    _read_until(s, protocol.FrameReader(), lambda m: m["t"] == protocol.PONG)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)  # the daemon is busy elsewhere
    try:
        s.sendall(_raw_log_frames(1, n))
        s.close()  # the trainer is gone
        daemon.proc.send_signal(signal.SIGTERM)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert daemon.proc.wait(timeout=30) == 0
    assert stored_steps(home, "orphan") == [(s, 1) for s in range(1, n + 1)]


def test_clients_starting_at_once_autostart_exactly_one_daemon(home: Path) -> None:
    """No daemon yet, four trainers call init() at the same instant: one daemon
    starts (the others' starts find the home's lock taken), every event lands once."""
    go = home.parent / "go"
    code = """
        import os, time
        import ckptd_client as ckptd
        while not os.path.exists(os.environ["GO_FILE"]):
            time.sleep(0.001)
        with ckptd.init(name=os.environ["RUN_NAME"]) as run:
            for step in range(200):
                run.log({"x": float(step)}, step=step)
            run.flush()
    """
    procs = [spawn_script(home, code, env=env_for(home, GO_FILE=os.fspath(go),
                                                  RUN_NAME=f"racer-{i}"))
             for i in range(4)]
    time.sleep(0.5)  # let all four reach the barrier
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "Traceback" not in err, err
    runs = db_rows(home, "SELECT id FROM runs WHERE name LIKE 'racer-%'")
    assert len(runs) == 4
    for (run_id,) in runs:
        assert stored_steps(home, run_id) == [(s, 1) for s in range(200)]
    daemons = [line for line in (home / paths.DAEMON_LOG).read_text().splitlines()
               if " serving " in line]
    assert len(daemons) == 1, daemons
