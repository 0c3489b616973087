"""``ckptd reproduce``: a deterministic run reruns bit-identically from its recorded
commit and diff (not from the directory as it is today), and a changed recorded
diff is found at the first step it changes."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from helpers import DaemonProc, ckptd, env_for

TRAIN = """\
import random
import sys

import ckptd_client as ckptd

LR = 0.1
run = ckptd.init(seed=int(sys.argv[1]), config={"lr": LR})
w = 1.0
for step in range(8):
    w -= LR * (w - random.random())
    run.log({"loss": w * w, "w": w}, step=step)
run.finish()
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


def make_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "proj"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "train.py").write_text(TRAIN)
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "train")
    return repo


def test_deterministic_run_reproduces_bit_identically_and_changed_diff_is_found(
        home: Path, daemon: DaemonProc, tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    env = env_for(home)
    # absolute script path and a subdirectory as cwd: both must move into the worktree
    subprocess.run([sys.executable, os.fspath(repo / "src" / "train.py"), "3"],
                   cwd=repo / "src", env=env, check=True, timeout=60, capture_output=True,
                   stdin=subprocess.DEVNULL)
    [orig] = json.loads(ckptd(home, "ls", "--json", check=True).stdout)
    # the checkout moves on after the run: reproduce must not use it
    (repo / "src" / "train.py").write_text(TRAIN.replace("LR = 0.1", "LR = 0.5"))

    proc = ckptd(home, "reproduce", orig["id"], "--json", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["identical"] is True and out["first_diff_step"] is None
    assert out["values_compared"] == 16 and out["final"]["original"] == out["final"]["reproduced"]
    assert "git_commit" not in out["provenance_differences"]
    assert Path(out["worktree"], "src", "train.py").read_text() == TRAIN

    # Deliberately change the recorded diff: from step 5 on, the update differs.
    changed = TRAIN.replace("    w -= LR", "    if step >= 5:\n        w += 0.25\n    w -= LR")
    (repo / "src" / "train.py").write_text(changed)
    diff = git(repo, "diff", "HEAD")
    git(repo, "checkout", "--", ".")
    daemon.stop()  # the test edits the store: only with no daemon writing it
    conn = sqlite3.connect(home / "ckptd.db")
    prov = json.loads(conn.execute("SELECT provenance FROM runs WHERE id = ?",
                                   (orig["id"],)).fetchone()[0])
    prov.update(git_diff=diff, git_dirty=True,
                git_diff_hash=hashlib.sha256(diff.encode()).hexdigest())
    conn.execute("UPDATE runs SET provenance = ? WHERE id = ?", (json.dumps(prov), orig["id"]))
    conn.commit()
    conn.close()
    daemon.start()

    proc = ckptd(home, "reproduce", orig["id"], "--json", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["identical"] is False and out["first_diff_step"] == 5
    assert {d["key"] for d in out["first_differences"]} == {"loss", "w"}
    assert out["differing_values"] == 6  # steps 5, 6, 7 x two keys
    text = ckptd(home, "reproduce", orig["id"], timeout=120)
    assert text.returncode == 1 and "differs: first at step 5" in text.stdout


def test_reproduce_refuses_a_run_without_git(home: Path, daemon: DaemonProc,
                                             tmp_path: Path) -> None:
    script = tmp_path / "plain" / "train.py"
    script.parent.mkdir()
    script.write_text(TRAIN)
    subprocess.run([sys.executable, os.fspath(script), "1"], cwd=script.parent,
                   env=env_for(home, GIT_CEILING_DIRECTORIES=os.fspath(tmp_path)),
                   check=True, timeout=60, capture_output=True, stdin=subprocess.DEVNULL)
    proc = ckptd(home, "reproduce")
    assert proc.returncode == 1 and "no git commit was recorded" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
