"""A resume chooses its step only after the run's in-flight commits: a trainer
killed right after ``checkpoint()`` returned must not be resumed from the step
before the one still committing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from helpers import DaemonProc, ckptd, db_rows, env_for

TRAINER = """
import os, signal, torch, ckptd_client as ckptd
run = ckptd.init()
if run.attempt == 1:
    run.checkpoint({"w": torch.full((256,), 1.0), "step": 1}, step=1).wait(timeout=60)
    run.checkpoint({"w": torch.full((256,), 2.0), "step": 2}, step=2)  # returns at snapshot
    os.kill(os.getpid(), signal.SIGKILL)  # while step 2 is still committing
state = run.restore()
print("restored", None if state is None else state["step"], flush=True)
run.finish()
"""


def test_resume_waits_for_the_checkpoint_still_committing(home: Path) -> None:
    d = DaemonProc(home, env=env_for(home, CKPTD_TEST_SLOW_COMMIT_S="3"))
    d.start()
    try:
        script = home.parent / "trainer.py"
        script.write_text(TRAINER)
        first = ckptd(home, "run", "--name", "slow", "--", sys.executable, os.fspath(script),
                      timeout=120)
        assert first.returncode == 128 + 9, first.stderr
        # step 2's commit sleeps 3 s after staging: it is still in flight now
        assert [s for (s,) in db_rows(home, "SELECT step FROM checkpoints")] == [1]
        res = ckptd(home, "resume", "slow", timeout=120)
        assert res.returncode == 0, res.stderr
        assert "restored 2" in res.stdout, (res.stdout, res.stderr)
        (restored,), = db_rows(home, "SELECT restored_step FROM attempts WHERE attempt = 2")
        assert restored == 2
    finally:
        d.stop()
