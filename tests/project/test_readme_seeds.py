"""README's "Is it better, or is it the seed?" works as written: its commands,
run as they are (fewer training steps), sweep, compare and reproduce."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from helpers import REPO, DaemonProc, env_for


def section_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    body = text.split("## Is it better, or is it the seed?", 1)[1].split("\n## ", 1)[0]
    return [shlex.split(m) for m in re.findall(r"^ {4}(ckptd .*)$", body, re.M)]


def test_readme_seed_section_commands_work(home: Path) -> None:
    commands = section_commands()
    assert [c[1] for c in commands] == ["sweep", "sweep", "compare", "reproduce"]
    env = env_for(home, CKPTD_SWEEP_POLL="0.2")
    d = DaemonProc(home, env=env)
    d.start()

    def ckptd(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ckptd", "--home", os.fspath(home),
                               *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)
    try:
        sweep, status, compare, reproduce = commands
        # as written, with 3 seeds instead of 5 and 20 steps (CI time)
        sweep = [sys.executable if a == "python" else "0-2" if a == "0-4" else a
                 for a in sweep] + ["--steps", "20"]
        proc = ckptd(sweep[1:])
        assert proc.returncode == 0, proc.stderr
        proc = ckptd(status[1:])
        assert proc.returncode == 0 and "finished 6" in proc.stdout, proc.stdout
        proc = ckptd([*compare[1:], "--json"])
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert [s["n"] for s in out["sides"]] == [3, 3]
        assert out["config_diff"] == {"lr": {"config.lr=3e-3": [0.003],
                                             "config.lr=3e-2": [0.03]}}
        print(ckptd(compare[1:]).stdout)  # shown with -s: the worked example
        runs = json.loads(ckptd(["ls", "--group", "lr-study", "--json"]).stdout)
        # the repository is a git checkout: the first run reruns bit-identically
        proc = ckptd([*reproduce[1:-1], runs[0]["id"], "--json"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["identical"] is True
        # ... and leaves no worktree entry in this checkout (the developer's own)
        worktrees = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True,
                                   text=True, check=True).stdout
        assert os.fspath(home) not in worktrees, worktrees
    finally:
        d.stop()
