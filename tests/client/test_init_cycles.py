"""Many runs in one process (sweeps, notebooks, test suites) stay cheap (issue 8.16).

``finish()`` waited out the link thread's 0.5 s ``select``; every ``init()``
wrapped ``sys.excepthook`` once more, so ~1000 of them ended in RecursionError
and the last run was never marked failed.
"""

from __future__ import annotations

import time
from pathlib import Path

from helpers import DaemonProc, db_rows, env_for, run_script

CYCLES = """
import time
import ckptd_client as ckptd
t = time.monotonic()
for i in range(50):
    run = ckptd.init(name=f"cycle{i}")
    run.log({"x": float(i)}, step=0)
    run.finish()
print(time.monotonic() - t)
"""


def test_fifty_init_finish_cycles_are_fast(home: Path, daemon: DaemonProc) -> None:
    proc = run_script(home, CYCLES, timeout=120)
    elapsed = float(proc.stdout.split()[-1])
    print(f"50 init/finish cycles: {elapsed:.2f} s")
    assert db_rows(home, "SELECT COUNT(*) FROM runs WHERE status = 'finished'") == [(50,)]
    assert elapsed < 12, f"50 init/finish cycles took {elapsed:.1f} s"


MANY = """
import ckptd_client as ckptd
for i in range(1200):
    ckptd.init(name=f"many{i}").finish(timeout=5)
last = ckptd.init(name="last")
last.log({"x": 1.0}, step=0)
raise RuntimeError("boom after 1200 runs")
"""


def test_twelve_hundred_inits_then_a_crash_marks_the_last_run_failed(home: Path) -> None:
    # no daemon: each cycle costs little (spool only); the last run is ingested later
    proc = run_script(home, MANY, check=False, timeout=300,
                      env=env_for(home, CKPTD_NO_AUTOSTART="1"))
    assert proc.returncode == 1
    assert "RecursionError" not in proc.stderr
    assert "boom after 1200 runs" in proc.stderr
    d = DaemonProc(home)
    d.start()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            rows = db_rows(home, "SELECT status, traceback FROM runs WHERE name = 'last'")
            if rows and rows[0][0] == "failed":
                break
            time.sleep(0.1)
        assert rows and rows[0][0] == "failed", rows
        assert "boom after 1200 runs" in rows[0][1]
    finally:
        d.stop()
