"""A sweep item stuck in ``launching`` (its launcher was killed -9 before its
run registered) is launched again after the launch grace, even when the wall
clock stepped back meanwhile (an NTP step after boot).

Real processes: the daemon runs under libfaketime, whose wall clock the test
steps back an hour (``FAKETIME_TIMESTAMP_FILE``; the boot clock is left
alone, as the kernel does in an NTP step); a real ``ckptd run`` launcher is
SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from helpers import DaemonProc, db_rows, env_for, wait_for
from test_sweep import TRAIN, calls, sweep_cli

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed "
                    "(apt-get install libfaketime)")
def test_stuck_launching_item_is_relaunched_after_a_clock_step_back(home: Path,
                                                                    tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN)
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    env = env_for(home, CALLS=os.fspath(tmp_path / "calls.jsonl"), CKPTD_SWEEP_POLL="0.1",
                  CKPTD_SWEEP_LAUNCH_GRACE="3")
    daemon_env = dict(env, LD_PRELOAD=os.fspath(FAKETIME),
                      FAKETIME_TIMESTAMP_FILE=os.fspath(clock), FAKETIME_NO_CACHE="1",
                      FAKETIME_DONT_FAKE_MONOTONIC="1")
    d = DaemonProc(home, env=daemon_env)
    d.start()
    try:
        proc = sweep_cli(home, env, tmp_path, "--name", "stuck", "--seeds", "0",
                         "--detach", "--", sys.executable, "train.py", "x", "1", "{seed}", "3")
        assert proc.returncode == 0, proc.stderr
        item = "SELECT run_id, launcher_pid FROM sweep_items WHERE sweep = 'stuck'"
        run_id, launcher = wait_for(lambda: (r := db_rows(home, item)) and r[0][1] and r[0],
                                    timeout=30, interval=0.005, what="the launcher")
        os.killpg(launcher, signal.SIGKILL)  # its own session: the launcher and anything it started
        assert not db_rows(home, "SELECT 1 FROM runs WHERE id = ?", (run_id,)), \
            "the launcher registered its run before it was killed: no stuck item to test"
        clock.write_text("-3600\n")  # the daemon's wall clock steps back an hour
        # after the grace (3 s of boot time) the item is launched again, same run id
        relaunched = wait_for(lambda: (r := db_rows(home, item)) and r[0][1] and
                              r[0][1] != launcher and r[0], timeout=40, interval=0.2,
                              what="the stuck item relaunched")
        assert relaunched[0] == run_id
        wait_for(lambda: db_rows(home, "SELECT status FROM runs WHERE id = ?", (run_id,))
                 == [("finished",)], timeout=60, what="the relaunched run finished")
        starts = [c for c in calls(env) if c["event"] == "start"]
        assert [(c["run"], c["attempt"], c["first"]) for c in starts] == [(run_id, 1, 0)]
        out = sweep_cli(home, env, tmp_path, "status", "stuck", "--json")
        assert json.loads(out.stdout)["counts"] == {"finished": 1}, out.stdout + out.stderr
    finally:
        d.stop()
