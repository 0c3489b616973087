"""Resume storms: after a reboot, auto-resumed runs start a few at a time
(``--max-concurrent-resumes``), the rest wait ``queued``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import DaemonProc, ckptd, db_rows, env_for, wait_for

RUNS = 6
SLOTS = 2
SETTLE = 2.0
SLEEPER = "import time, ckptd_client as c; c.init(); time.sleep(120)"


def signal_all(home: Path, sig: int) -> None:
    pids = {p for row in db_rows(home, "SELECT pid, supervisor_pid FROM runs") for p in row
            if p}
    pids |= {p for (p,) in db_rows(home, "SELECT pid FROM attempts") if p}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_all(home: Path, sups: list[subprocess.Popen[bytes]]) -> None:
    signal_all(home, signal.SIGKILL)
    for sup in sups:
        if sup.poll() is None:
            sup.kill()
        sup.wait(timeout=10)


def test_a_reboot_relaunches_a_few_runs_at_a_time(home: Path) -> None:
    before = env_for(home, CKPTD_TEST_BOOT_ID="boot-before")
    after = env_for(home, CKPTD_TEST_BOOT_ID="boot-after", CKPTD_RESTART_BACKOFF="0",
                    CKPTD_MAX_CONCURRENT_RESUMES=str(SLOTS), CKPTD_RESUME_SETTLE_S=str(SETTLE))
    d = DaemonProc(home, env=before)
    d.start()
    sups: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(RUNS):
            sups.append(subprocess.Popen(
                [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "run", "--name",
                 f"r{i}", "--auto-resume", "--", sys.executable, "-c", SLEEPER],
                env=before, cwd=home.parent, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: db_rows(home, "SELECT COUNT(*) FROM runs WHERE pid IS NOT NULL")[0][0]
                 == RUNS, timeout=120, what="every run to register")
        # power cut: everything stops at once (frozen first, so no client notices
        # the daemon die and starts another), then is gone
        signal_all(home, signal.SIGSTOP)
        d.kill9()
        kill_all(home, sups)

        d = DaemonProc(home, env=after)  # the machine came back with a new boot id
        d.start()
        seen_queued = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rows = json.loads(ckptd(home, "ls", "--json", check=True).stdout)
            seen_queued = max(seen_queued, sum(r["status"] == "queued" for r in rows))
            if all(r["attempt"] == 2 for r in rows):
                break
            time.sleep(0.3)
        starts = sorted(t for (t,) in db_rows(home, "SELECT started FROM attempts WHERE"
                                                    " attempt = 2"))
        assert len(starts) == RUNS, starts
        gaps = [round(starts[i + SLOTS] - starts[i], 2) for i in range(RUNS - SLOTS)]
        print(f"relaunch times (s after the first): {[round(t - starts[0], 2) for t in starts]}")
        # at most SLOTS start within one settle period of each other
        assert all(g >= SETTLE * 0.9 for g in gaps), gaps
        assert seen_queued >= RUNS - SLOTS - 1, seen_queued
        queued_events = db_rows(home, "SELECT COUNT(*) FROM events WHERE message LIKE"
                                      " 'auto-resume queued%'")[0][0]
        assert queued_events >= RUNS - SLOTS
    finally:
        kill_all(home, sups)
        d.stop()


def test_backoff_jitter_is_per_run_and_bounded(monkeypatch) -> None:
    from ckptd.daemon.autoresume import backoff

    monkeypatch.setenv("CKPTD_RESTART_BACKOFF", "10")
    delays = {backoff(1, f"run-{i}") for i in range(20)}
    assert len(delays) > 15 and all(20 <= x <= 25 for x in delays)
    assert backoff(1, "run-1") == backoff(1, "run-1")  # fixed: a level-triggered scan agrees
    assert backoff(1) == 20


def test_gpu_admission_waits_only_when_a_gpu_is_seen() -> None:
    from ckptd.daemon.autoresume import gpu_free_mib, gpu_ready

    free = gpu_free_mib()  # None here without nvidia-smi; a list of MiB on a GPU machine
    assert free is None or (free and all(isinstance(x, int) and x >= 0 for x in free))
    assert gpu_ready(8000, None)  # no GPU / no nvidia-smi: no wait
    assert gpu_ready(0, [10])
    assert not gpu_ready(8000, [4000, 7999])
    assert gpu_ready(8000, [4000, 9000])
