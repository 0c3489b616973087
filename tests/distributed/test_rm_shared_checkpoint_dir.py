"""``ckptd rm`` of a run whose checkpoints live in a shared directory
(``init(checkpoint_dir=D)``) removes ``D/<run-id>/`` too, crash-safely, and
never follows a link out of ``D``. Real daemon, real files, a real restart.
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers import ckptd, db_rows, run_script

SAVE = """
import ckptd_client as ckptd
run = ckptd.init(checkpoint_dir={shared!r})
for step in (3, 7):
    run.checkpoint({{"w": [1.0, float(step)], "step": step}}, step=step).wait()
print("run", run.id)
run.finish()
"""


def saved_run(home: Path, shared: Path) -> str:
    return run_script(home, SAVE.format(shared=os.fspath(shared))).stdout.split()[-1]


def test_rm_removes_the_runs_shared_checkpoint_dir(home: Path, daemon, tmp_path: Path) -> None:
    shared = tmp_path / "nfs" / "ckpt"
    gone, kept = saved_run(home, shared), saved_run(home, shared)
    assert (shared / gone / "step-7").is_dir()
    ckptd(home, "rm", "--yes", gone, check=True)
    assert not (home / "runs" / gone).exists()
    # the run's directory in D is gone, nothing renamed aside is left; the
    # other run's checkpoints (and D itself) are untouched
    assert sorted(p.name for p in shared.iterdir()) == [kept]
    assert {p.name for p in (shared / kept).iterdir()} == {"step-3", "step-7"}
    verify = ckptd(home, "ckpt", "verify", kept)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_crash_during_rm_is_finished_at_the_next_start(home: Path, daemon,
                                                         tmp_path: Path) -> None:
    """The files a kill -9 between ``rm``'s renames and its row deletion leaves:
    both directories renamed aside, rows still there. The daemon's next start
    deletes both; ``rm`` again removes the rows."""
    shared = tmp_path / "nfs" / "ckpt"
    run_id = saved_run(home, shared)
    daemon.terminate()
    os.rename(shared / run_id, shared / f"{run_id}.ckptd-rm")
    os.rename(home / "runs" / run_id, home / "runs" / f"{run_id}.ckptd-rm")
    daemon.start()
    assert list(shared.iterdir()) == []
    assert not (home / "runs" / f"{run_id}.ckptd-rm").exists()
    ckptd(home, "rm", "--yes", run_id, check=True)
    assert db_rows(home, "SELECT COUNT(*) FROM runs WHERE id = ?", (run_id,)) == [(0,)]


def test_rm_after_a_crash_between_the_two_renames_finishes(home: Path, daemon,
                                                           tmp_path: Path) -> None:
    """Only ``D/<run-id>`` was renamed aside (the first rename) when rm died:
    the run is still listed; ``rm`` again removes it and the renamed directory."""
    shared = tmp_path / "nfs" / "ckpt"
    run_id = saved_run(home, shared)
    os.rename(shared / run_id, shared / f"{run_id}.ckptd-rm")
    ckptd(home, "rm", "--yes", run_id, check=True)
    assert list(shared.iterdir()) == []
    assert not (home / "runs" / run_id).exists()


def test_rm_never_follows_a_link_out_of_the_shared_dir(home: Path, daemon,
                                                       tmp_path: Path) -> None:
    shared = tmp_path / "nfs" / "ckpt"
    run_id = saved_run(home, shared)
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "data").write_text("keep me")
    # D/<run-id> replaced by a link to a directory outside D
    for p in sorted((shared / run_id).rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (shared / run_id).rmdir()
    os.symlink(elsewhere, shared / run_id)
    ckptd(home, "rm", "--yes", run_id, check=True)
    assert (elsewhere / "data").read_text() == "keep me"
    assert not (home / "runs" / run_id).exists()
