"""``ckptd run --requeue`` under SLURM: one ``scontrol requeue`` after a preempted attempt.

``scontrol`` is a fake executable on PATH (a real process) that records its argv and
how many checkpoints of the run were committed when it was called.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import db_rows, env_for, wait_for

TRAIN = """
import sys, time, ckptd_client as ckptd
run = ckptd.init()
got = run.restore()
step = got["step"] + 1 if got else 0
print("start", step, flush=True)
if "--fail" in sys.argv:
    sys.exit(3)
while step < 150 and not run.should_stop:
    run.log({"x": step}, step=step)
    step += 1
    time.sleep(0.01)
if run.should_stop:
    run.checkpoint({"step": step - 1}, step=step - 1).wait(30)
    print("preempted at", step - 1, flush=True)
run.finish()
"""

FAKE_SCONTROL = """#!{python}
import json, os, sqlite3, sys
db = sqlite3.connect("file:" + os.environ["CKPTD_HOME"] + "/ckptd.db?mode=ro", uri=True)
committed = db.execute("SELECT COUNT(*) FROM checkpoints WHERE status = 'committed'").fetchone()[0]
with open(os.environ["SCONTROL_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "committed": committed}}) + "\\n")
"""


@pytest.fixture
def fake_scontrol(tmp_path: Path) -> tuple[Path, Path]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "scontrol"
    exe.write_text(FAKE_SCONTROL.format(python=sys.executable))
    exe.chmod(0o755)
    return bindir, tmp_path / "scontrol.jsonl"


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def start(home: Path, tmp_path: Path, fake: tuple[Path, Path], *args: str,
          **env: str) -> subprocess.Popen[str]:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    bindir, log = fake
    full = env_for(home, PATH=f"{bindir}:{os.environ['PATH']}", SCONTROL_LOG=os.fspath(log),
                   **env)
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        if key not in env:
            full.pop(key, None)
    return subprocess.Popen(
        [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "run", "--requeue", "--",
         sys.executable, os.fspath(script), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full,
        stdin=subprocess.DEVNULL)


def preempt(home: Path, sup: subprocess.Popen[str], run_id: str | None = None) -> tuple[str, str]:
    """SIGUSR1 to the trainer (what ``#SBATCH --signal=USR1@120`` sends) once it logs."""
    try:
        pid = wait_for(lambda: (rows := db_rows(
            home, "SELECT r.pid FROM runs r JOIN metrics m ON m.run_id = r.id AND"
                  " m.attempt = r.attempt AND m.src != 'd' WHERE r.pid IS NOT NULL" +
                  (" AND r.id = ?" if run_id else "") + " LIMIT 1",
            (run_id,) if run_id else ())) and rows[0][0], timeout=60, what="a logging trainer")
        os.kill(pid, signal.SIGUSR1)
        return sup.communicate(timeout=60)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


def test_preempted_attempt_requeues_the_job_once_and_the_requeued_job_continues(
        home: Path, daemon, tmp_path: Path, fake_scontrol: tuple[Path, Path]) -> None:
    log = fake_scontrol[1]
    sup = start(home, tmp_path, fake_scontrol, SLURM_JOB_ID="4242")
    out, err = preempt(home, sup)
    assert sup.returncode == 0, err
    assert "requeued SLURM job 4242" in err, err
    # exactly once, with the job id, after the preemption checkpoint was committed
    assert calls(log) == [{"argv": ["requeue", "4242"], "committed": 1}], calls(log)
    run = db_rows(home, "SELECT id, status, auto_resume, attempt FROM runs")
    assert run == [("slurm-4242", "preempted", 0, 1)], run
    step = db_rows(home, "SELECT step FROM checkpoints")[0][0]
    # the requeued job runs the same line again: it continues the run, and finishes
    sup = start(home, tmp_path, fake_scontrol, SLURM_JOB_ID="4242")
    out, err = sup.communicate(timeout=120)
    assert sup.returncode == 0, err
    assert f"start {step + 1}" in out, out + err
    assert db_rows(home, "SELECT id, status, attempt FROM runs") == \
        [("slurm-4242", "finished", 2)]
    assert len(calls(log)) == 1, calls(log)  # a normal finish does not requeue


def test_no_requeue_without_slurm_or_on_failure(home: Path, daemon, tmp_path: Path,
                                                fake_scontrol: tuple[Path, Path]) -> None:
    log = fake_scontrol[1]
    sup = start(home, tmp_path, fake_scontrol)  # no SLURM_JOB_ID
    _out, err = preempt(home, sup)
    assert sup.returncode == 0, err
    assert "not under SLURM" in err, err
    assert db_rows(home, "SELECT status FROM runs") == [("preempted",)]
    sup = start(home, tmp_path, fake_scontrol, "--fail", SLURM_JOB_ID="77")
    _out, err = sup.communicate(timeout=60)
    assert sup.returncode == 3, err
    assert db_rows(home, "SELECT status FROM runs WHERE id = 'slurm-77'") == [("failed",)]
    assert calls(log) == [], calls(log)
