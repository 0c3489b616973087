"""A clean stop (SIGTERM, ``ckptd stop``, systemd) finishes what it accepted.

Issue 8.3: shutdown joined the writer, spool and sweeper threads but not the
checkpoint workers, so a checkpoint whose snapshot was taken was cut at
SIGTERM and discarded at the next start as a staging leftover (SPEC promise 3).
"""

from __future__ import annotations

from pathlib import Path

from ckptd_client.checkpoint import format as fmt
from helpers import DaemonProc, ckptd, db_rows, env_for, run_script, wait_for

from ckptd.daemon import crashpoints

#: Sends one checkpoint and dies at once: its snapshot was taken, so the daemon
#: owes it a commit whatever happens next.
CHECKPOINT_THEN_DIE = """
import os, torch, ckptd_client as ckptd
run = ckptd.init(name="clean-stop")
print(run.id, flush=True)
run.checkpoint({"w": torch.full((256, 1024), 7.0), "step": 7}, step=7)
os._exit(0)
"""

#: Seconds the commit is held at ``ckpt.staged`` (files written, not renamed).
DELAY = 3.0


def test_sigterm_finishes_a_checkpoint_in_flight(home: Path) -> None:
    env = env_for(home, **{crashpoints.DELAY_ENV: f"ckpt.staged:{DELAY}"})
    d = DaemonProc(home, env=env)
    d.start()
    try:
        run_id = run_script(home, CHECKPOINT_THEN_DIE,
                            env=env_for(home, CKPTD_NO_AUTOSTART="1")).stdout.split()[0]
        root = home / "runs" / run_id / "checkpoints"
        staging = root / (fmt.step_dir_name(7) + fmt.STAGING_SUFFIX)
        wait_for(staging.exists, what="the commit to be in flight")
        assert d.terminate(timeout=DELAY + 60) == 0
    finally:
        d.stop()
    log = (home / "daemon.log").read_text()
    d = DaemonProc(home)
    d.start()
    try:
        rows = db_rows(home, "SELECT step, status FROM checkpoints WHERE run_id = ?", (run_id,))
        assert rows == [(7, "committed")], rows
        assert not staging.exists()
        verify = ckptd(home, "ckpt", "verify", run_id)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "staging leftover" not in (home / "daemon.log").read_text()
    finally:
        d.stop()
    # the daemon says why its stop took longer
    assert "finishing 1 in-flight commit" in log, log
    assert "in-flight commit(s) finished" in log, log
