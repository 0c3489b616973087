"""Promise 5: a resumed run continues as if nothing happened.

Real training (examples/train_resumable.py: shuffled loader, dropout, Adam,
cosine LR, checkpoints every 5 steps), real ``kill -9``, real ``ckptd
resume``, a real daemon restarted with another boot id for a "reboot".
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, DaemonProc, ckptd, db_rows, env_for, wait_for

EXAMPLE = REPO / "examples" / "train_resumable.py"
STEPS = 40


def run_row(home: Path, name: str) -> dict | None:
    rows = db_rows(home, "SELECT id, status, attempt, pid, reason, auto_resume, restarts,"
                         " exit_code, signal FROM runs WHERE name = ? ORDER BY started DESC",
                   (name,))
    if not rows:
        return None
    keys = ["id", "status", "attempt", "pid", "reason", "auto_resume", "restarts",
            "exit_code", "signal"]
    return dict(zip(keys, rows[0], strict=True))


def attempt_peak(home: Path, run_id: str, attempt: int) -> int:
    (peak,), = db_rows(home, "SELECT COALESCE(MAX(step), -1) FROM metrics WHERE run_id = ?"
                             " AND attempt = ? AND src GLOB 'c*'", (run_id, attempt))
    return peak


def effective_curve(home: Path, run_id: str) -> list[tuple[int, str, float]]:
    out = ckptd(home, "metrics", run_id, "--format", "jsonl", check=True).stdout
    return [(r["step"], r["key"], r["value"]) for r in map(json.loads, out.splitlines())]


def train_cmd(out: Path, name: str, sleep: float) -> list[str]:
    return [sys.executable, os.fspath(EXAMPLE), "--steps", str(STEPS), "--sleep", str(sleep),
            "--name", name, "--out", os.fspath(out)]


def wait_supervisor_done(home: Path, run_id: str, attempt: int) -> None:
    """A detached supervisor reports last; wait for it before the daemon goes."""
    wait_for(lambda: db_rows(home, "SELECT 1 FROM events WHERE run_id = ? AND attempt = ?"
                                   " AND src = 's' AND kind = 'status'", (run_id, attempt)),
             timeout=30, what=f"the supervisor of attempt {attempt} to report")


def wait_status(home: Path, name: str, *statuses: str, timeout: float = 30) -> dict:
    return wait_for(lambda: (r := run_row(home, name)) and r["status"] in statuses and r,
                    timeout=timeout, interval=0.05, what=f"{name} to become {statuses}")


def test_killed_at_random_moments_and_resumed_is_bit_identical(
        home: Path, daemon: DaemonProc, long_mode: bool) -> None:
    # CKPTD_TEST_SEED=<seed> replays a failure: same kill steps
    seed = int(os.environ.get("CKPTD_TEST_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    kills = 5 if long_mode else 2
    targets = sorted(rng.sample(range(3, STEPS - 3), kills))
    print(f"kill seed {seed}: kill at steps {targets} (replay: CKPTD_TEST_SEED={seed})")
    env = env_for(home)

    ref_out, cut_out = home.parent / "ref.hash", home.parent / "cut.hash"
    subprocess.run(train_cmd(ref_out, "ref", 0), env=env, cwd=home.parent, check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=120)

    # attempt 1: started directly (no supervisor); the daemon must notice it vanish
    with open(home.parent / "cut.log", "ab") as log:
        proc = subprocess.Popen(train_cmd(cut_out, "cut", 0.05), env=env, cwd=home.parent,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    run_id = wait_for(lambda: (r := run_row(home, "cut")) and r["id"], what="registration")

    def kill_attempt(attempt: int) -> None:
        if attempt == 1:
            proc.kill()
            proc.wait(timeout=10)
        else:
            (pid,), = db_rows(home, "SELECT pid FROM attempts WHERE run_id = ? AND attempt = ?",
                              (run_id, attempt))
            os.kill(pid, signal.SIGKILL)
        row = wait_status(home, "cut", "interrupted")
        assert row["attempt"] == attempt
        if attempt == 1:
            assert "vanished" in row["reason"], row  # found by liveness: no supervisor
        else:
            assert row["signal"] == signal.SIGKILL, row  # reported by the supervisor

    def resume_detached(attempt: int) -> int:
        res = ckptd(home, "resume", "cut", "--detach", check=True)
        assert f"attempt {attempt}" in res.stdout
        wait_for(lambda: db_rows(home, "SELECT pid FROM attempts WHERE run_id = ? AND"
                                       " attempt = ?", (run_id, attempt))[0][0],
                 what="the resumed process to start")
        return attempt

    attempt, early = 1, set()
    for i, target in enumerate(targets):
        wait_for(lambda a=attempt, t=target: attempt_peak(home, run_id, a) >= t, timeout=60,
                 interval=0.01, what=f"attempt {attempt} to reach step {target}")
        time.sleep(rng.uniform(0, 0.05))  # anywhere inside the step: forward, save, log
        kill_attempt(attempt)
        if i == len(targets) - 1:
            break
        attempt = resume_detached(attempt + 1)
        if long_mode and i == 0:
            # killed while starting up: before (or while) it restores
            time.sleep(rng.uniform(0, 1.0))
            kill_attempt(attempt)
            early.add(attempt)
            attempt = resume_detached(attempt + 1)

    final = ckptd(home, "resume", "cut", timeout=120)
    assert final.returncode == 0, final.stderr
    row = run_row(home, "cut")
    assert row["status"] == "finished" and row["attempt"] == attempt + 1

    replay = f"replay: CKPTD_TEST_SEED={seed}"
    assert cut_out.read_text() == ref_out.read_text(), f"weights differ ({replay})"
    ref_curve = effective_curve(home, "ref")
    assert len(ref_curve) == 2 * STEPS
    assert effective_curve(home, "cut") == ref_curve, f"loss curve differs ({replay})"
    restored = db_rows(home, "SELECT attempt, restored_step FROM attempts WHERE run_id = ?"
                             " ORDER BY attempt", (run_id,))
    assert [a for a, _ in restored] == list(range(1, attempt + 2))
    assert all(s is not None for a, s in restored[1:] if a not in early), restored
    tail = ckptd(home, "tail", "cut", "-n", "1000", check=True).stdout
    assert "resumed after checkpoint step" in tail


def test_resume_refuses_running_and_finished_runs(home: Path, daemon: DaemonProc) -> None:
    script = home.parent / "short.py"
    script.write_text("import sys, time, ckptd_client as c\n"
                      "run = c.init(name=sys.argv[1])\n"
                      "time.sleep(float(sys.argv[2]))\n"
                      "run.finish()\n")
    env = env_for(home)
    subprocess.run([sys.executable, os.fspath(script), "done", "0"], env=env, check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    res = ckptd(home, "resume", "done")
    assert res.returncode == 6
    assert "finished" in res.stderr and "--force" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1

    slow = subprocess.Popen([sys.executable, os.fspath(script), "busy", "60"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: run_row(home, "busy"), what="registration")
        res = ckptd(home, "resume", "busy")
        assert res.returncode == 6
        assert "running" in res.stderr and "Traceback" not in res.stderr
        assert run_row(home, "busy")["attempt"] == 1
    finally:
        slow.kill()
        slow.wait(timeout=10)

    # deliberate: --force runs a finished run again, as a new attempt
    res = ckptd(home, "resume", "done", "--force", timeout=60)
    assert res.returncode == 0, res.stderr
    row = run_row(home, "done")
    assert row["attempt"] == 2 and row["status"] == "finished"
    res = ckptd(home, "resume", "no-such-run")
    assert res.returncode == 2 and "no run" in res.stderr


def test_reboot_interrupts_and_auto_resume_finishes_across_daemon_restarts(home: Path) -> None:
    before = env_for(home, CKPTD_TEST_BOOT_ID="boot-before", CKPTD_RESTART_BACKOFF="0")
    after = env_for(home, CKPTD_TEST_BOOT_ID="boot-after", CKPTD_RESTART_BACKOFF="0")
    d = DaemonProc(home, env=before)
    d.start()
    out = home.parent / "rb.hash"
    with open(home.parent / "rb.log", "ab") as log:
        sup = subprocess.Popen(
            [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "run", "--name", "rb",
             "--auto-resume", "--", *train_cmd(out, "rb", 0.1)],
            env=before, cwd=home.parent, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        run_id = wait_for(lambda: (r := run_row(home, "rb")) and r["pid"] and r["id"],
                          timeout=60, what="registration")
        wait_for(lambda: attempt_peak(home, run_id, 1) >= 6, timeout=60, what="progress")
        (pid,), = db_rows(home, "SELECT pid FROM runs WHERE id = ?", (run_id,))
        # power cut: everything stops at the same instant (frozen first, so
        # nothing notices the others die), then is gone
        os.kill(pid, signal.SIGSTOP)
        sup.send_signal(signal.SIGSTOP)
        d.kill9()
        os.kill(pid, signal.SIGKILL)
        sup.kill()
        sup.wait(timeout=10)

        d = DaemonProc(home, env=after)  # the machine came back with a new boot id
        d.start()
        wait_for(lambda: run_row(home, "rb")["attempt"] >= 2, timeout=30,
                 what="auto-resume after the reboot")
        (first,), = db_rows(home, "SELECT status FROM attempts WHERE run_id = ? AND"
                                  " attempt = 1", (run_id,))
        assert first == "interrupted"
        assert "rebooted" in (home / "daemon.log").read_text()
        wait_for(lambda: db_rows(home, "SELECT pid FROM attempts WHERE run_id = ? AND"
                                       " attempt = 2", (run_id,))[0][0],
                 timeout=60, what="the relaunched process to register")

        # the relaunched run is nobody's child: it outlives a daemon crash
        d.kill9()
        time.sleep(0.5)
        d.start()
        row = wait_status(home, "rb", "finished", "failed", "interrupted", timeout=90)
        assert row["status"] == "finished", row
        assert row["attempt"] == 2 and row["restarts"] == 1
        wait_supervisor_done(home, run_id, 2)
        assert len(out.read_text()) == 64
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait(timeout=10)
        d.stop()


def test_run_that_fails_at_once_is_not_relaunched_forever(home: Path) -> None:
    d = DaemonProc(home, env=env_for(home, CKPTD_RESTART_BACKOFF="0"))
    d.start()
    try:
        res = ckptd(home, "run", "--name", "bad", "--auto-resume", "--max-restarts", "10", "--",
                    sys.executable, "-c", "import sys; print('boom'); sys.exit(2)")
        assert res.returncode == 2 and "boom" in res.stdout
        row = wait_for(lambda: (r := run_row(home, "bad")) and r["auto_resume"] == 0 and r,
                       timeout=60, what="auto-resume to give up")
        assert "auto-resume stopped" in row["reason"] and "without progress" in row["reason"]
        assert row["attempt"] == 3 and row["status"] == "failed"
        time.sleep(2.5)  # another sweep: nothing new starts
        assert run_row(home, "bad")["attempt"] == 3
        show = ckptd(home, "show", "bad", check=True).stdout
        assert "auto-resume stopped" in show
    finally:
        d.stop()


@pytest.mark.slow
def test_restart_limit_stops_auto_resume(home: Path) -> None:
    d = DaemonProc(home, env=env_for(home, CKPTD_RESTART_BACKOFF="0"))
    d.start()
    try:
        ckptd(home, "run", "--name", "lim", "--auto-resume", "--max-restarts", "1", "--",
              sys.executable, "-c", "import sys; sys.exit(1)")
        row = wait_for(lambda: (r := run_row(home, "lim")) and r["auto_resume"] == 0 and r,
                       timeout=60, what="auto-resume to give up")
        assert "--max-restarts 1" in row["reason"] and row["attempt"] == 2
    finally:
        d.stop()


def test_relaunch_policy_is_pure_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptd.daemon.autoresume import MAX_BACKOFF_S, backoff, stuck

    monkeypatch.setenv("CKPTD_RESTART_BACKOFF", "5")
    assert [backoff(n) for n in range(4)] == [5, 10, 20, 40]
    assert backoff(50) == MAX_BACKOFF_S
    assert stuck([(1, 10), (2, 10)]) is None  # too few attempts to tell
    assert stuck([(1, 10), (2, 25), (3, 40)]) is None  # progressing
    assert "step 40" in stuck([(1, 12), (2, 40), (3, 40), (4, 40)])
    assert "start-up" in stuck([(1, None), (2, None), (3, None)])


def test_ctrl_c_stops_an_auto_resume_run_for_good(home: Path) -> None:
    """A person pressing Ctrl-C means stop: auto-resume must not bring it back,
    until the person resumes it."""
    d = DaemonProc(home, env=env_for(home, CKPTD_RESTART_BACKOFF="0"))
    d.start()
    try:
        sup = subprocess.Popen(
            [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "run", "--name", "cc",
             "--auto-resume", "--", sys.executable, "-c",
             "import time, ckptd_client as c; c.init(); time.sleep(60)"],
            env=env_for(home), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: (r := run_row(home, "cc")) and r["pid"], timeout=30,
                 what="registration")
        os.killpg(sup.pid, signal.SIGINT)  # what the terminal does: the whole group
        assert sup.wait(timeout=30) != 0
        row = wait_status(home, "cc", "interrupted")
        assert row["auto_resume"] == 0 and "SIGINT" in row["reason"]
        time.sleep(2.5)  # a sweep: nothing relaunches it
        assert run_row(home, "cc")["attempt"] == 1
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
            sup.wait()
        d.stop()
