"""README.md tells a newcomer the truth: two set-up commands, CI runs the same test
command, and the demo it advertises really trains a run and logs its metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

from helpers import ckptd

REPO = Path(__file__).resolve().parents[2]


def setup_commands() -> list[str]:
    """Indented code lines of README.md that start with ``pip install``."""
    text = (REPO / "README.md").read_text()
    return [m.strip() for m in re.findall(r"^(?: {4}|\t)(pip install.*)$", text, re.M)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    commands = setup_commands()
    assert len(commands) == 2, commands
    demo = [c for c in commands if c.endswith("ckptd demo")]
    assert len(demo) == 1, commands
    [test_cmd] = [c for c in commands if c not in demo]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert test_cmd in ci, f"{test_cmd!r} is not what .ci/run runs: {ci}"
    assert "pytest" in test_cmd
    # torch first, pinned, so pip never pulls a CUDA build as a dependency
    for c in commands:
        assert c.startswith("pip install torch==2.13.0 && "), c


def test_demo_trains_a_run_with_metrics(tmp_path: Path) -> None:
    home = tmp_path / "home"
    try:
        proc = ckptd(home, "demo", "--steps", "50", timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "ckptd tail" in proc.stdout and "ckptd metrics" in proc.stdout
        runs = [r for r in json.loads(ckptd(home, "ls", "--json", check=True).stdout)
                if r["name"] == "demo"]  # the crash test adds runs of its own
        assert len(runs) == 1 and runs[0]["status"] == "finished" and runs[0]["step"] == 49
        assert "bit-identical" in proc.stdout
        rows = ckptd(home, "metrics", runs[0]["id"], "--key", "loss", "--format", "jsonl",
                     check=True).stdout.splitlines()
        losses = [json.loads(r)["value"] for r in rows]
        assert len(losses) == 50 and all(v == v and v > 0 for v in losses)
    finally:
        stop = ckptd(home, "stop")
        assert stop.returncode == 0 and "Traceback" not in stop.stderr
