"""Preemption notices in one process: SIGTERM sets ``run.should_stop`` only for a
script that asks for it; the attempt that checkpoints and exits is ``preempted``."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from helpers import db_rows, spawn_script

LOOP = """
import time, ckptd_client as ckptd
run = ckptd.init()
print("ready", flush=True)
step = 0
while not run.should_stop:
    run.log({"x": step}, step=step)
    step += 1
    time.sleep(0.01)
run.checkpoint({"step": step}, step=step).wait(30)
print("stopped", step, flush=True)
run.finish()
"""

UNAWARE = """
import time, ckptd_client as ckptd
run = ckptd.init()
print("ready", flush=True)
time.sleep(60)
"""


def test_sigterm_sets_should_stop_and_the_attempt_is_preempted(home: Path, daemon) -> None:
    proc = spawn_script(home, LOOP)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    step = int(out.split()[-1])
    assert db_rows(home, "SELECT status FROM runs") == [("preempted",)]
    assert db_rows(home, "SELECT status FROM attempts") == [("preempted",)]
    assert db_rows(home, "SELECT step, status FROM checkpoints") == [(step, "committed")]


def test_a_script_that_never_asks_still_dies_of_sigterm(home: Path, daemon) -> None:
    proc = spawn_script(home, UNAWARE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - t0 < 10
