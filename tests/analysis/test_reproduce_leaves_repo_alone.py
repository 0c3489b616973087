"""``ckptd reproduce`` only reads the repository the run came from: it gains no
worktree entry, ref or config, so deleting the reproduce directory leaves
nothing dangling (``git worktree add`` listed it as "prunable" forever after).
The commit is found by id, also when no branch holds it any more."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import DaemonProc, ckptd, env_for
from test_reproduce import TRAIN, git, make_repo


def repo_state(repo: Path) -> dict[str, str]:
    """What a reproduce could leave in the user's repository."""
    return {"worktrees": git(repo, "worktree", "list", "--porcelain"),
            "refs": git(repo, "for-each-ref"),
            "config": (repo / ".git" / "config").read_text(),
            "status": git(repo, "status", "--porcelain"),
            "dirs": " ".join(sorted(os.listdir(repo / ".git")))}


def test_reproduce_adds_nothing_to_the_users_repository(
        home: Path, daemon: DaemonProc, tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    subprocess.run([sys.executable, os.fspath(repo / "src" / "train.py"), "3"],
                   cwd=repo / "src", env=env_for(home), check=True, timeout=60,
                   capture_output=True, stdin=subprocess.DEVNULL)
    [orig] = json.loads(ckptd(home, "ls", "--json", check=True).stdout)
    # the run's commit is rewritten (amend): no branch holds it any more
    (repo / "NOTES").write_text("later\n")
    git(repo, "add", "NOTES")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--amend", "-m", "x")
    before = repo_state(repo)

    proc = ckptd(home, "reproduce", orig["id"], "--json", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["identical"] is True and "git_commit" not in out["provenance_differences"]
    copy = Path(out["worktree"])
    assert copy.is_relative_to(home / "reproduce")
    assert (copy / "src" / "train.py").read_text() == TRAIN and not (copy / "NOTES").exists()
    assert repo_state(repo) == before

    # the user deletes the reproduction: the repository has nothing to prune
    shutil.rmtree(copy)
    assert git(repo, "worktree", "prune", "--dry-run", "--verbose") == ""
    assert os.fspath(copy) not in git(repo, "worktree", "list")
