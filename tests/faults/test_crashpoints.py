"""Crash points and random kill -9: SPEC promises 1 and 2 at every step of the write paths.

The daemon is started with ``CKPTD_CRASH_AT=<point>[:<count>]`` and SIGKILLs
itself at that step (``ckptd/daemon/crashpoints.py``). The training process keeps
going (its client starts a new daemon, as systemd would), and after it ends
the test checks the promises on the real store. Every point in
``crashpoints.POINTS`` is run; a test fails if the daemon never reached it, so
a renamed or removed point cannot turn the matrix into a no-op.

The randomized part kills the trainer, the daemon or both at random moments;
each trial prints its seed (``CKPTD_TEST_SEED`` replays one).
"""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ckptd_client import paths, transport
from ckptd_client.checkpoint import format as fmt
from helpers import (
    REPO,
    RESTORE_SCRIPT,
    DaemonProc,
    db_rows,
    env_for,
    kill_home_daemon,
    run_script,
    wait_for,
)

from ckptd.daemon import crashpoints

#: Logs ``N`` steps, flushing every 50, then finishes. Prints its run id first.
EVENTS_TRAINER = """
import os, sys
import ckptd_client as ckptd

n = int(os.environ.get("STEPS", "300"))
run = ckptd.init(name="crash")
print("run", run.id, flush=True)
for step in range(n):
    run.log({"x": float(step)}, step=step)
    if step % 50 == 49:
        run.flush(timeout=60)
run.finish(timeout=60)
"""


def _run_id(out: str) -> str:
    m = re.search(r"^run (\S+)$", out, re.M)
    assert m, out
    return m.group(1)


def steps_once(home: Path, run_id: str) -> list[int]:
    """Stored steps of metric x, asserting none is stored twice."""
    rows = db_rows(home, "SELECT step, COUNT(*) FROM metrics WHERE run_id = ? AND key = 'x'"
                   " GROUP BY step ORDER BY step", (run_id,))
    doubled = [s for s, n in rows if n != 1]
    assert not doubled, f"steps stored more than once: {doubled[:10]}"
    return [s for s, _ in rows]


def integrity_ok(home: Path) -> None:
    conn = sqlite3.connect(f"file:{home / 'ckptd.db'}?mode=ro", uri=True, timeout=30)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def spool_left(home: Path) -> list[str]:
    try:
        return os.listdir(paths.spool_dir(home))
    except FileNotFoundError:
        return []


def ensure_daemon(home: Path) -> None:
    """A daemon serves ``home`` (the one a client auto-started, or a new one),
    as systemd's ``Restart=always`` would guarantee after a crash."""
    transport.connect_or_start(home).close()


def crashing_daemon(home: Path, point: str) -> DaemonProc:
    return DaemonProc(home, env=env_for(home, **{crashpoints.ENV: point}))


def assert_crashed_at(d: DaemonProc, point: str) -> None:
    """The daemon died at the point (SIGKILL by itself), so the case really ran."""
    assert d.proc is not None
    d.proc.wait(timeout=60)
    log = (d.home / "daemon.log").read_text(errors="replace")
    assert d.proc.returncode == -signal.SIGKILL, f"daemon exited {d.proc.returncode}:\n{log}"
    name, _, count = point.partition(":")
    assert f"crash point {name} reached (hit {count or 1})" in log, log


def test_every_point_is_in_the_code() -> None:
    """A point listed but never called would make its matrix case a no-op."""
    sources = "".join(p.read_text() for p in (REPO / "ckptd").rglob("*.py"))
    called = set(re.findall(r'crashpoint\("([^"]+)"\)', sources))
    missing = [p for p in crashpoints.POINTS if p not in called]
    assert not missing, f"points listed but never reached: {missing}"
    unknown = called - set(crashpoints.POINTS)
    assert not unknown, f"points called but not listed in POINTS: {unknown}"


#: Goes through every point of the event and checkpoint commits (and a flush).
EVERY_POINT_TRAINER = """
import ckptd_client as ckptd, torch
run = ckptd.init(name="inert")
for step in range(120):
    run.log({"x": float(step)}, step=step)
    if step % 40 == 39:
        run.flush(timeout=60)
run.checkpoint({"w": torch.ones(64, 64)}, step=1).wait(timeout=60)
run.finish(timeout=60)
print("finished", flush=True)
"""


def test_crashpoint_is_inert_without_the_variable(home: Path) -> None:
    """A daemon started without CKPTD_CRASH_AT passes every point and lives on."""
    env = env_for(home)
    env.pop(crashpoints.ENV, None)
    d = DaemonProc(home, env=env)
    d.start()
    try:
        out = run_script(home, EVERY_POINT_TRAINER, env=env)
        assert "finished" in out.stdout
        assert d.proc is not None and d.proc.poll() is None, "the daemon died"
        # and no client had to start a replacement
        assert int((home / "daemon.lock").read_text().strip()) == d.pid
        log = (home / "daemon.log").read_text(errors="replace")
        assert "crash point" not in log, log
        assert db_rows(home, "SELECT status FROM checkpoints") == [("committed",)]
    finally:
        d.stop()


def _counts(long_mode: bool) -> list[int]:
    """Which hit of a point kills the daemon: the run's first commit, and one
    mid-stream (acked events and a spool behind it) even in CI."""
    return [1, 3, 7, 12] if long_mode else [1, 5]


@pytest.mark.parametrize("point", crashpoints.EVENT_POINTS)
def test_event_commit_crash(home: Path, point: str, long_mode: bool) -> None:
    """Daemon dies at a step of the group commit; after a new daemon: every
    event present exactly once, the run finished, the store intact."""
    first = home
    for count in _counts(long_mode):
        if count > 1:
            kill_home_daemon(home)
            home = first.parent / f"home{count}"
            home.mkdir(mode=0o700)
        try:
            _event_crash_case(home, f"{point}:{count}")
        finally:
            if home != first:  # the fixture stops the first home's daemon
                kill_home_daemon(home)


def _event_crash_case(home: Path, spec: str) -> None:
    """One crash of the group commit at ``spec``, then the promises."""
    d = crashing_daemon(home, spec)
    d.start()
    out = run_script(home, EVENTS_TRAINER, env=env_for(home, STEPS="300"), timeout=120)
    run_id = _run_id(out.stdout)
    assert_crashed_at(d, spec)
    ensure_daemon(home)
    wait_for(lambda: len(steps_once(home, run_id)) == 300 and not spool_left(home),
             timeout=30, what="all 300 events committed and the spool drained")
    assert steps_once(home, run_id) == list(range(300))
    assert db_rows(home, "SELECT status FROM runs WHERE id = ?", (run_id,)) == \
        [("finished",)]
    integrity_ok(home)


SPOOLED_TRAINER = """
import ckptd_client as ckptd
run = ckptd.init(name="spooled", autostart=False)
print("run", run.id, flush=True)
for step in range(200):
    run.log({"x": float(step)}, step=step)
run.finish(timeout=10)
"""


@pytest.mark.parametrize("point", crashpoints.SPOOL_POINTS)
def test_spool_ingestion_crash(home: Path, point: str) -> None:
    """Daemon dies while ingesting a spool file; the next daemon ingests what is
    left: every event exactly once, no spool file left behind."""
    out = run_script(home, SPOOLED_TRAINER, env=env_for(home, CKPTD_NO_AUTOSTART="1"))
    run_id = _run_id(out.stdout)
    assert spool_left(home), "the trainer should have spooled (no daemon)"
    d = crashing_daemon(home, point)
    d.start(wait=False)
    assert_crashed_at(d, point)
    again = DaemonProc(home)
    again.start()
    try:
        wait_for(lambda: len(steps_once(home, run_id)) == 200 and not spool_left(home),
                 timeout=30, what="spool ingested after the crash")
        assert steps_once(home, run_id) == list(range(200))
        integrity_ok(home)
    finally:
        again.stop()


# ------------------------------------------------------------- random kills

#: Logs until told to stop (or killed); appends "<step>" after each log()
#: returned and "F<step>" after each flush() returned, unbuffered.
KILL_TRAINER = """
import os, sys, time
import ckptd_client as ckptd

out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
run = ckptd.init(name="victim")
os.write(out, f"run {run.id}\\n".encode())
step = 0
while not os.path.exists(sys.argv[2]):
    run.log({"x": float(step)}, step=step)
    os.write(out, b"%d\\n" % step)
    if step % 100 == 99:
        run.flush(timeout=60)
        os.write(out, b"F%d\\n" % step)
    step += 1
    if step % 20 == 0:
        time.sleep(0.001)
run.flush(timeout=60)
os.write(out, b"F%d\\n" % (step - 1))
run.finish(timeout=60)
os.write(out, b"done\\n")
"""


def _progress(path: Path) -> tuple[str | None, int, int, bool]:
    run_id, logged, flushed, done = None, -1, -1, False
    try:
        lines = path.read_text().split("\n")[:-1]
    except FileNotFoundError:
        return None, -1, -1, False
    for line in lines:
        if line.startswith("run "):
            run_id = line[4:]
        elif line.startswith("F"):
            flushed = int(line[1:])
        elif line == "done":
            done = True
        elif line:
            logged = int(line)
    return run_id, logged, flushed, done


def kill_trial(root: Path, seed: int, mode: str) -> None:
    """One randomized trial; raises AssertionError naming the seed."""
    rng = random.Random(seed)
    home = root / f"trial-{seed}"
    home.mkdir(mode=0o700)
    env = env_for(home)
    prog, stop = root / f"prog-{seed}", root / f"stop-{seed}"
    script = root / "kill_trainer.py"
    script.write_text(KILL_TRAINER)
    daemon = DaemonProc(home, env=env)
    trainer = None
    try:
        daemon.start()
        trainer = subprocess.Popen([sys.executable, os.fspath(script), os.fspath(prog),
                                    os.fspath(stop)], env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _progress(prog)[1] >= 20, timeout=60, what="trainer logging")
        time.sleep(rng.uniform(0.0, 0.8))
        if mode in ("trainer", "both"):
            trainer.send_signal(signal.SIGKILL)
        if mode in ("daemon", "both"):
            daemon.kill9()
        if mode != "daemon":
            trainer.wait(timeout=30)
        run_id, logged, flushed, _ = _progress(prog)
        assert run_id is not None
        if mode == "daemon":
            time.sleep(rng.uniform(0.0, 0.5))  # keeps logging: spool, autostart, resend
            stop.touch()
            assert trainer.wait(timeout=90) == 0
            run_id, logged, flushed, done = _progress(prog)
            assert done
        else:
            daemon = DaemonProc(home, env=env)  # the new daemon (systemd's restart)
            daemon.start()
        if mode == "both":
            # promise: what flush() confirmed survives; the rest may be lost
            # with both processes, but nothing is doubled and nothing is torn
            wait_for(lambda: not spool_left(home), timeout=30, what="spool drained")
            present = steps_once(home, run_id)
            lost = sorted(set(range(flushed + 1)) - set(present))
            assert not lost, f"flush() returned for step {flushed}, yet {lost[:10]} are lost"
        else:
            # promise: every log() that returned is stored, exactly once
            want = set(range(logged + 1))
            wait_for(lambda: want <= set(steps_once(home, run_id)) and not spool_left(home),
                     timeout=30, what=f"steps 0..{logged} stored")
            # the step after the last recorded one may be there too: its log()
            # returned, but the kill came before the test's progress record
            assert set(steps_once(home, run_id)) - want <= {logged + 1}
        status = "finished" if mode == "daemon" else "interrupted"
        wait_for(lambda: db_rows(home, "SELECT status FROM runs WHERE id = ?", (run_id,))
                 == [(status,)], timeout=30, what=f"run {status}")
        integrity_ok(home)
    except AssertionError as exc:
        raise AssertionError(f"kill trial mode={mode} seed={seed} "
                             f"(replay: CKPTD_TEST_SEED={seed}): {exc}") from None
    finally:
        stop.touch()
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        daemon.stop()
        kill_home_daemon(home)


@pytest.mark.parametrize("mode", ["trainer", "daemon", "both"])
def test_random_kill9(tmp_path: Path, mode: str, long_mode: bool) -> None:
    """kill -9 of the trainer, the daemon or both at random moments."""
    base = int(os.environ.get("CKPTD_TEST_SEED") or random.randrange(1 << 30))
    trials = 20 if long_mode else 2
    for i in range(trials):
        seed = base + i
        print(f"kill trial {i} mode={mode} seed={seed}")
        kill_trial(tmp_path, seed, mode)


# -------------------------------------------------------------- checkpoints

#: Checkpoint step 1 (must become durable), then step 2 (the daemon dies on
#: the way), then finish. Each state is filled with its step, so a restored
#: state tells which checkpoint it came from and whether it is whole.
CKPT_TRAINER = """
import ckptd_client as ckptd, torch
from ckptd_client.errors import CkptdError

run = ckptd.init(name="ckpt-crash")
print("run", run.id, flush=True)
run.checkpoint({"w": torch.full((256, 256), 1.0), "step": 1}, step=1).wait(timeout=60)
print("durable 1", flush=True)
try:
    run.checkpoint({"w": torch.full((256, 256), 2.0), "step": 2}, step=2).wait(timeout=60)
    print("durable 2", flush=True)
except CkptdError as exc:
    print("lost 2:", type(exc).__name__, flush=True)
run.log({"x": 1.0}, step=3)
run.finish(timeout=60)
"""



def restored(home: Path, run_id: str, attempt: int = 2) -> tuple[int | None, str]:
    """(step, 'whole'/'TORN') of what a resumed attempt's restore() picks."""
    out = run_script(home, RESTORE_SCRIPT, env=env_for(home, CKPTD_RUN_ID=run_id,
                                                CKPTD_ATTEMPT=str(attempt))).stdout
    m = re.search(r"^restored (none|(\d+) (\w+))$", out, re.M)
    assert m, out
    return (None, "") if m.group(1) == "none" else (int(m.group(2)), m.group(3))


def no_staging_left(home: Path, run_id: str) -> bool:
    root = paths.checkpoints_dir(home, run_id)
    return not [n for n in os.listdir(root) if not re.fullmatch(r"step-\d+", n)]


@pytest.mark.parametrize("point", crashpoints.CHECKPOINT_POINTS)
def test_checkpoint_commit_crash(home: Path, point: str) -> None:
    """Daemon dies at a step of the checkpoint commit. The durable checkpoint
    stays committed and verifies; the interrupted one is invisible when the
    daemon died before the rename and committed from the rename on (reconcile
    records a verifying step-<N>/ without a row); restore() never picks a torn
    one; the restarted daemon removes staging leftovers."""
    spec = f"{point}:2"
    d = crashing_daemon(home, spec)
    d.start()
    out = run_script(home, CKPT_TRAINER, timeout=180).stdout
    run_id = _run_id(out)
    assert "durable 1" in out, out
    assert_crashed_at(d, spec)
    ensure_daemon(home)
    wait_for(lambda: no_staging_left(home, run_id), timeout=30,
             what="staging leftovers removed by the restarted daemon")
    if point in ("ckpt.after_rename", "ckpt.before_row"):
        # step-2/ is complete on disk without a row: the reconcile of the
        # restarted daemon (in the background) records it, as documented
        wait_for(lambda: db_rows(home, "SELECT status FROM checkpoints WHERE run_id = ? AND"
                                 " step = 2", (run_id,)) == [("committed",)], timeout=60,
                 what="reconcile recording step 2 (on disk, no row)")
    rows = dict(db_rows(home, "SELECT step, status FROM checkpoints WHERE run_id = ?",
                        (run_id,)))
    assert rows.get(1) == "committed", rows
    if point in ("ckpt.staged", "ckpt.before_rename"):
        # the client hands the unconfirmed snapshot to the restarted daemon,
        # which commits it whole (before, it was lost: invisible)
        assert "durable 2" in out and rows.get(2) == "committed", (out, rows)
    if point == "ckpt.after_row":
        assert rows.get(2) == "committed", rows
    step, state = restored(home, run_id)
    assert state == "whole", f"restore() picked a torn checkpoint: step {step}"
    assert step == (2 if rows.get(2) == "committed" else 1)
    # every committed row verifies (what `ckptd ckpt verify` checks)
    for step, digest in db_rows(home, "SELECT step, hash FROM checkpoints WHERE run_id = ?"
                                " AND status = 'committed'", (run_id,)):
        fmt.verify_dir(paths.checkpoints_dir(home, run_id) / f"step-{step}", digest)
    integrity_ok(home)
