"""``ckptd sweep``: every combination runs exactly once, at most --parallel at a
time, and the queue survives a ``kill -9`` of the daemon (and of a trainer):
finished runs stay finished, the interrupted one resumes from its checkpoint,
pending ones start."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DaemonProc, ckptd, db_rows, env_for, wait_for

#: Appends one JSON line per start and per end to the file named by CALLS.
TRAIN = """\
import json, os, sys, time
import ckptd_client as ckptd

a, b, seed, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
run = ckptd.init(config={"a": a, "b": b, "seed": seed})
state = run.restore()
first = state["step"] + 1 if state else 0

def note(**kw):
    with open(os.environ["CALLS"], "a") as f:
        f.write(json.dumps(dict(kw, a=a, b=b, seed=seed, run=run.id, attempt=run.attempt,
                                t=time.time())) + "\\n")

note(event="start", first=first)
for step in range(first, steps):
    run.log({"loss": float(seed) + step}, step=step)
    if step % 5 == 4:
        run.checkpoint({"step": step}, step=step)
    time.sleep(float(os.environ.get("STEP_S", "0")))
note(event="end")
run.finish()
"""


@pytest.fixture
def sweep_env(home: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    (tmp_path / "train.py").write_text(TRAIN)
    env = env_for(home, CALLS=os.fspath(tmp_path / "calls.jsonl"), CKPTD_SWEEP_POLL="0.2",
                  CKPTD_RESTART_BACKOFF="0.2")
    yield env


def calls(env: dict[str, str]) -> list[dict]:
    path = Path(env["CALLS"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sweep_cli(home: Path, env: dict[str, str], cwd: Path, *args: str,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptd", "--home", os.fspath(home), "sweep",
                           *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_grid_sweep_runs_every_combination_exactly_once(home: Path, tmp_path: Path,
                                                       sweep_env: dict[str, str]) -> None:
    d = DaemonProc(home, env=sweep_env)
    d.start()
    try:
        args = ["--name", "grid", "--grid", "a=x,y", "--grid", "b=1,2,3", "--seeds", "0-1",
                "--parallel", "2", "--", sys.executable, "train.py", "{a}", "{b}", "{seed}",
                "3"]
        dry = sweep_cli(home, sweep_env, tmp_path, "--dry-run", *args)
        assert dry.returncode == 0 and len(dry.stdout.splitlines()) == 12, dry.stderr
        assert not calls(sweep_env) and not db_rows(home, "SELECT 1 FROM runs")
        proc = sweep_cli(home, sweep_env, tmp_path, "--json", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        status = json.loads(proc.stdout)
        assert status["done"] and status["counts"] == {"finished": 12}
        starts = [c for c in calls(sweep_env) if c["event"] == "start"]
        combos = sorted((c["a"], c["b"], c["seed"]) for c in starts)
        assert combos == sorted(itertools.product("xy", "123", (0, 1)))  # each exactly once
        assert {c["attempt"] for c in starts} == {1}
        # at most 2 at once: sweep the start/end times
        ends = {c["run"]: c["t"] for c in calls(sweep_env) if c["event"] == "end"}
        spans = [(c["t"], ends[c["run"]]) for c in starts]
        most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
        assert 1 <= most <= 2, spans
        runs = json.loads(ckptd(home, "ls", "--group", "grid", "--json", check=True).stdout)
        assert len(runs) == 12 and {r["status"] for r in runs} == {"finished"}
        assert "grid:a=x,b=1,seed=0" in {r["name"] for r in runs}
        # asked again with the same spec: nothing runs twice
        again = sweep_cli(home, sweep_env, tmp_path, *args)
        assert again.returncode == 0 and "resumed (same spec)" in again.stderr
        assert len([c for c in calls(sweep_env) if c["event"] == "start"]) == 12
        other = sweep_cli(home, sweep_env, tmp_path, "--name", "grid", "--seeds", "0-5", "--",
                          "python", "t.py", "{seed}")
        assert other.returncode != 0 and "exists with other" in other.stderr
        assert "Traceback" not in other.stderr
    finally:
        d.stop()


def test_sweep_survives_daemon_kill9_and_a_killed_trainer(home: Path, tmp_path: Path,
                                                          sweep_env: dict[str, str]) -> None:
    env = dict(sweep_env, STEP_S="0.06")
    d = DaemonProc(home, env=env)
    d.start()
    try:
        proc = sweep_cli(home, env, tmp_path, "--name", "cut", "--grid", "a=x", "--grid",
                         "b=1", "--seeds", "0-2", "--parallel", "2", "--detach", "--",
                         sys.executable, "train.py", "{a}", "{b}", "{seed}", "40")
        assert proc.returncode == 0, proc.stderr

        def two_past_a_checkpoint() -> list[tuple]:
            rows = db_rows(home, "SELECT r.id, r.pid FROM runs r WHERE r.status = 'running'"
                           " AND (SELECT MAX(step) FROM checkpoints c WHERE c.run_id = r.id)"
                           " >= 9")
            return rows if len(rows) == 2 else []

        running = wait_for(two_past_a_checkpoint, timeout=60, what="two runs past step 9")
        d.kill9()
        victim_run, victim_pid = running[0]
        os.kill(victim_pid, signal.SIGKILL)
        time.sleep(0.5)
        d.start()  # (a client may have auto-started one already: then that one serves)

        def done() -> dict | None:
            out = ckptd(home, "sweep", "status", "cut", "--json", env=env)
            st = json.loads(out.stdout) if out.returncode == 0 else None
            return st if st and st["done"] else None

        st = wait_for(done, timeout=120, interval=0.5, what="the sweep to finish")
        assert st["counts"] == {"finished": 3}, st
        starts = [c for c in calls(env) if c["event"] == "start"]
        firsts = sorted(c["seed"] for c in starts if c["attempt"] == 1)
        assert firsts == [0, 1, 2]  # nothing was started twice from scratch
        resumed = [c for c in starts if c["attempt"] > 1]
        assert resumed and all(c["first"] >= 5 for c in resumed), starts
        assert victim_run in {c["run"] for c in resumed}
        restored = db_rows(home, "SELECT restored_step FROM attempts WHERE run_id = ? AND"
                                 " attempt > 1", (victim_run,))
        assert restored and all(r[0] >= 4 for r in restored)
        # the effective curve of the resumed run is whole: one value per step
        steps = db_rows(home, "SELECT step FROM effective_metrics WHERE run_id = ? AND"
                              " key = 'loss' ORDER BY step", (victim_run,))
        assert [s[0] for s in steps] == list(range(40))
    finally:
        d.stop()
