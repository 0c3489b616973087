"""A stalled daemon costs ``log()`` no more than a bounded amount of work per
call, and unacked frames are bounded in bytes (issues 8.11, 8.12).

The stall is real: the test holds SQLite's write lock, so the daemon's writer
waits in its commit while its readers go on taking frames off the sockets;
the client's unacked frames pile up. Crossing the old bound (200,000 frames)
decoded and re-spooled all of them inside one ``log()``: a 6-8 s stall.
Then the lock is released and every value must arrive.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from helpers import DaemonProc, db_rows, env_for, spawn_script, wait_for

SMALL = """
import os, time
import ckptd_client as ckptd
from ckptd_client import run as run_mod
run_mod.MAX_PENDING_BYTES = 4 << 20  # (a client without it ignores this)
run = ckptd.init(name="stalled")
worst = 0.0
for step in range(int(os.environ["N"])):
    t = time.perf_counter()
    run.log({"x": float(step)}, step=step)
    worst = max(worst, time.perf_counter() - t)
with open(os.environ["MARK"], "w") as f:
    f.write(f"{worst}\\n")
run.flush(timeout=120)
run.finish()
"""

BIG = """
import os
import ckptd_client as ckptd
from ckptd_client import run as run_mod
run_mod.MAX_PENDING_BYTES = 1 << 20
run = ckptd.init(name="big")
peak = 0
for step in range(int(os.environ["N"])):
    run.log({f"k{i}": float(step) for i in range(1000)}, step=step)
    peak = max(peak, sum(len(f) for _, f in run._pending))
with open(os.environ["MARK"], "w") as f:
    f.write(f"{peak}\\n")
run.flush(timeout=120)
run.finish()
"""


def stalled(home: Path, tmp_path: Path, code: str, n: int) -> tuple[str, float]:
    """Run ``code`` while the store's write lock is held; what it wrote, the run's id."""
    mark = tmp_path / "mark"
    lock = sqlite3.connect(home / "ckptd.db", timeout=30, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        proc = spawn_script(home, code, env=env_for(home, N=str(n), MARK=os.fspath(mark)))
        wait_for(lambda: mark.exists() or proc.poll() is not None, timeout=120,
                 what="the script logged everything")
    finally:
        lock.execute("COMMIT")
        lock.close()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return err, float(mark.read_text())


def test_log_latency_stays_small_while_the_daemon_stalls(home: Path, daemon: DaemonProc,
                                                         tmp_path: Path) -> None:
    n = 220_000  # past the old 200,000-frame bound too
    t0 = time.monotonic()
    _, worst = stalled(home, tmp_path, SMALL, n)
    print(f"max log() latency while stalled: {worst:.3f} s ({time.monotonic() - t0:.1f} s)")
    rows = db_rows(home, "SELECT COUNT(DISTINCT m.step) FROM metrics m JOIN runs r"
                   " ON r.id = m.run_id WHERE r.name = 'stalled' AND m.key = 'x'")
    assert rows == [(n,)]
    assert db_rows(home, "SELECT status FROM runs WHERE name = 'stalled'") == [("finished",)]
    assert worst < 0.5, f"one log() call took {worst:.2f} s"


def test_unacked_frames_are_bounded_in_bytes(home: Path, daemon: DaemonProc,
                                             tmp_path: Path) -> None:
    n = 200  # ~20 KB a frame: ~4 MB, where a bound of 1 MiB applies
    _, peak = stalled(home, tmp_path, BIG, n)
    print(f"peak unacked bytes in memory: {peak / 2**20:.1f} MiB")
    wait_for(lambda: db_rows(home, "SELECT COUNT(DISTINCT m.step) FROM metrics m JOIN runs r"
                             " ON r.id = m.run_id WHERE r.name = 'big' AND m.key = 'k999'")
             == [(n,)], timeout=60, what="every big step")
    assert peak <= (1 << 20) + (256 << 10), f"{peak} bytes of unacked frames in memory"
