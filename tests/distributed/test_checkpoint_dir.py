"""``init(checkpoint_dir=D)`` / ``CKPTD_CHECKPOINT_DIR``: a run's checkpoints in
``D/<run-id>/`` (a shared file system), linked from the home, for one process
as for many ranks. Real daemon, real files, real restart of the daemon.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from helpers import ckptd, env_for, run_script

SAVE = """
import ckptd_client as ckptd
run = ckptd.init(checkpoint_dir={shared!r})
for step in (3, 7):
    run.checkpoint({{"w": [1.0, 2.0, float(step)], "step": step}}, step=step).wait()
print("run", run.id)
run.finish()
"""

RESTORE = """
import ckptd_client as ckptd
run = ckptd.init()
state = run.restore()
print("restored", state["step"], state["w"])
run.finish()
"""


def test_checkpoints_go_to_the_shared_dir_and_every_command_follows(home: Path, daemon,
                                                                    tmp_path: Path) -> None:
    shared = tmp_path / "nfs" / "ckpt"
    out = run_script(home, SAVE.format(shared=os.fspath(shared))).stdout
    run_id = out.split()[-1]
    link = home / "runs" / run_id / "checkpoints"
    assert link.is_symlink() and Path(os.readlink(link)) == shared / run_id
    assert {p.name for p in (shared / run_id).iterdir()} == {"step-3", "step-7"}
    ckpts = json.loads(ckptd(home, "ckpt", "ls", run_id, "--json", check=True).stdout)
    assert [(c["step"], c["status"]) for c in ckpts] == [(3, "committed"), (7, "committed")]
    verify = ckptd(home, "ckpt", "verify", run_id)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # a resumed attempt (CKPTD_CHECKPOINT_DIR is in the recorded environment
    # too; here the link alone is enough) restores the newest
    proc = run_script(home, RESTORE, env=env_for(home, CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT="2"))
    assert "restored 7 [1.0, 2.0, 7.0]" in proc.stdout, proc.stdout + proc.stderr
    # the daemon's start-up sweep works through the link: a staging leftover
    # (a crash mid-commit) in the shared directory is removed
    leftover = shared / run_id / "step-9.ckptd-tmp"
    leftover.mkdir()
    daemon.terminate()
    daemon.start()
    assert not leftover.exists()
    assert (shared / run_id / "step-7").is_dir()


def test_a_checkpoint_dir_that_cannot_be_used_fails_the_checkpoint_not_training(
        home: Path, daemon, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    code = f"""
import ckptd_client as ckptd
run = ckptd.init(checkpoint_dir={os.fspath(not_a_dir)!r})
try:
    run.checkpoint({{"step": 1}}, step=1).wait()
except ckptd.CheckpointError as exc:
    print("failed:", exc)
run.log({{"loss": 1.0}}, step=1)
print("training goes on")
run.finish()
"""
    proc = run_script(home, code)
    assert "training goes on" in proc.stdout, proc.stdout + proc.stderr
    assert "failed: checkpoint step 1: checkpoint_dir" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
