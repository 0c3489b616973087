"""A wall-clock step must not make a live run look vanished (issue 8, lead "wall-clock steps").

Liveness tells a live process from a recycled pid by its start time. Recorded as
seconds since the epoch, that time moved with the wall clock: after an NTP step
(common right after boot on a machine without a clock battery) a daemon that
starts, or restarts, judged a live trainer gone, marked the run interrupted,
and auto-resume would have started it a second time. Start times are now
seconds since boot, which no clock step moves.

The test steps the real clock (root, CAP_SYS_TIME) and puts it back.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import DaemonProc, db_rows, env_for, spawn_script, wait_for

STEP_S = 300.0

TRAINER = """
import os, time
import ckptd_client as ckptd
run = ckptd.init(name="steady")
print(run.id, flush=True)
step = 0
while not os.path.exists(os.environ["STOP_FILE"]):
    run.log({"x": float(step)}, step=step)
    step += 1
    time.sleep(0.05)
run.finish()
"""


def _can_set_clock() -> bool:
    try:
        time.clock_settime(time.CLOCK_REALTIME, time.time())
        return True
    except (PermissionError, OSError):
        return False


@pytest.mark.skipif(not _can_set_clock(), reason="needs CAP_SYS_TIME to step the clock")
def test_a_clock_step_does_not_make_a_live_run_look_vanished(home: Path) -> None:
    stop = home.parent / "stop"
    d = DaemonProc(home)
    d.start()
    proc = spawn_script(home, TRAINER, env=env_for(home, STOP_FILE=os.fspath(stop),
                                                   CKPTD_NO_AUTOSTART="1"))
    stepped = False
    try:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        wait_for(lambda: (db_rows(home, "SELECT pid FROM runs WHERE id = ?", (run_id,))
                          or [[None]])[0][0] is not None, what="the trainer registered")
        # The trainer cannot reconnect while stopped, so the new daemon can
        # judge it only by its pid and start time.
        os.kill(proc.pid, signal.SIGSTOP)
        d.kill9()
        time.clock_settime(time.CLOCK_REALTIME, time.time() + STEP_S)
        stepped = True
        d.start()
        time.sleep(6.0)  # several liveness sweeps (every 2 s)
        status = db_rows(home, "SELECT status, reason FROM runs WHERE id = ?", (run_id,))[0]
        assert status[0] == "running", f"a live trainer was judged gone: {status}"
    finally:
        if stepped:
            time.clock_settime(time.CLOCK_REALTIME, time.time() - STEP_S)
        os.kill(proc.pid, signal.SIGCONT)
        stop.touch()
        proc.communicate(timeout=60)
        d.stop()
    assert db_rows(home, "SELECT status FROM runs WHERE id = ?", (run_id,)) == [("finished",)]
