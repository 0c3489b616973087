"""``ckptd run -- torchrun --max-restarts N``: the run's end is right after elastic restarts.

The supervisor starts attempt 1; each TorchElastic restart makes the ranks
begin attempt 1 + ``TORCHELASTIC_RESTART_COUNT``. When torchrun exits, the
supervisor's report of how the command ended is the end of the run's
*current* attempt, not of attempt 1 (which the restart already closed).
Real processes: torchrun with gloo on CPU, a real daemon, a real SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import db_rows, env_for, wait_for

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_ddp.py"


def rank_pids(agent: int) -> list[int]:
    """The worker processes torchrun's agent (a child of ``agent``) started."""
    import psutil

    try:
        procs = psutil.Process(agent).children(recursive=True)
    except psutil.Error:
        return []
    return [p.pid for p in procs
            if any(a.endswith("train_ddp.py") for a in p.cmdline()[:3])]


def supervised(home: Path, *extra: str, max_restarts: int = 2, steps: int = 30,
               run_args: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "run", *run_args, "--",
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "2", "--max-restarts", str(max_restarts),
            os.fspath(EXAMPLE), "--steps", str(steps), "--ckpt-every", "5",
            "--sleep", "0.1", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_for(home, OMP_NUM_THREADS="1"), stdin=subprocess.DEVNULL)


def kill_rank_at(home: Path, sup: subprocess.Popen[str], step: int, rank: int = 1) -> str:
    run_id = wait_for(lambda: (db_rows(home, "SELECT id FROM runs") or [[None]])[0][0],
                      timeout=60, what="the run")
    wait_for(lambda: (db_rows(home, "SELECT MAX(step) FROM metrics WHERE run_id = ?",
                              (run_id,))[0][0] or 0) >= step, timeout=90, what=f"step {step}")
    pids = wait_for(lambda: len(rank_pids(sup.pid)) == 2 and rank_pids(sup.pid), timeout=30,
                    what="two ranks")
    os.kill(sorted(pids)[rank], signal.SIGKILL)
    return run_id


def finish(sup: subprocess.Popen[str], timeout: float = 150) -> tuple[str, str]:
    try:
        return sup.communicate(timeout=timeout)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


def test_elastic_restart_under_ckptd_run_ends_finished(home: Path, daemon) -> None:
    sup = supervised(home)
    run_id = kill_rank_at(home, sup, 7)
    out, err = finish(sup)
    assert sup.returncode == 0, err[-3000:]
    # the run row says how the job ended at once, not after a liveness sweep
    assert db_rows(home, "SELECT status, attempt, exit_code FROM runs WHERE id = ?",
                   (run_id,))[0][:3:2] == ("finished", 0), \
        db_rows(home, "SELECT * FROM runs")
    attempts = db_rows(home, "SELECT attempt, status FROM attempts WHERE run_id = ? "
                             "ORDER BY attempt", (run_id,))
    assert len(attempts) >= 2, attempts
    assert attempts[0][1] in ("failed", "interrupted"), attempts
    assert attempts[-1][1] == "finished", attempts
    # every earlier attempt is ended, none left running
    assert all(s != "running" for _, s in attempts), attempts
    assert db_rows(home, "SELECT attempt FROM runs WHERE id = ?", (run_id,))[0][0] == \
        attempts[-1][0]


def test_elastic_restarts_used_up_under_ckptd_run_ends_failed(home: Path, daemon) -> None:
    """--max-restarts 1, then rank 0 of the restarted attempt is killed -9 (it reports
    nothing): torchrun gives up, and the supervisor's report ends attempt 2 ``failed``."""
    sup = supervised(home, max_restarts=1)
    run_id = kill_rank_at(home, sup, 4, rank=1)
    wait_for(lambda: db_rows(home, "SELECT attempt FROM runs WHERE id = ?", (run_id,))[0][0]
             == 2, timeout=90, what="attempt 2")
    wait_for(lambda: (db_rows(home, "SELECT MAX(step) FROM metrics WHERE run_id = ? AND"
                                    " attempt = 2", (run_id,))[0][0] or 0) >= 7,
             timeout=90, what="attempt 2 at step 7")
    pids = wait_for(lambda: len(rank_pids(sup.pid)) == 2 and rank_pids(sup.pid), timeout=30,
                    what="two ranks")
    rank0 = db_rows(home, "SELECT pid FROM runs WHERE id = ?", (run_id,))[0][0]
    assert rank0 in pids, (rank0, pids)
    os.kill(rank0, signal.SIGKILL)
    _out, err = finish(sup)
    assert sup.returncode != 0, err[-3000:]
    run = db_rows(home, "SELECT status, attempt, exit_code, reason FROM runs WHERE id = ?",
                  (run_id,))[0]
    assert run[:3] == ("failed", 2, 1), run
    attempts = db_rows(home, "SELECT attempt, status FROM attempts WHERE run_id = ? "
                             "ORDER BY attempt", (run_id,))
    assert attempts[0][1] in ("failed", "interrupted") and attempts[1] == (2, "failed"), \
        attempts


@pytest.mark.slow  # a guard (it passed before the routing fix): --long
def test_sigterm_to_ckptd_run_during_an_elastic_restart_is_a_persons_stop(home: Path,
                                                                         daemon) -> None:
    """SIGTERM to ``ckptd run --auto-resume`` while attempt 2 (a TorchElastic
    restart) runs: the run ends ``interrupted`` with auto-resume off, attempt 2
    (not attempt 1) gets that end, and no rank process is left."""
    import psutil

    sup = supervised(home, max_restarts=2, steps=200, run_args=("--auto-resume",))
    run_id = kill_rank_at(home, sup, 4, rank=1)
    wait_for(lambda: db_rows(home, "SELECT attempt FROM runs WHERE id = ?", (run_id,))[0][0]
             == 2, timeout=90, what="attempt 2")
    wait_for(lambda: (db_rows(home, "SELECT MAX(step) FROM metrics WHERE run_id = ? AND"
                                    " attempt = 2", (run_id,))[0][0] or 0) >= 7,
             timeout=90, what="attempt 2 at step 7")
    procs = [psutil.Process(p) for p in wait_for(
        lambda: len(rank_pids(sup.pid)) == 2 and rank_pids(sup.pid), timeout=30,
        what="two ranks")]
    procs += psutil.Process(sup.pid).children(recursive=True)  # torchrun's agent too
    sup.send_signal(signal.SIGTERM)
    _out, err = finish(sup)
    assert sup.returncode != 0, err[-3000:]
    run = db_rows(home, "SELECT status, attempt, auto_resume, reason FROM runs WHERE id = ?",
                  (run_id,))[0]
    assert run[:3] == ("interrupted", 2, 0), run
    assert "SIGTERM" in run[3], run
    attempts = db_rows(home, "SELECT attempt, status FROM attempts WHERE run_id = ? "
                             "ORDER BY attempt", (run_id,))
    assert attempts[0][1] in ("failed", "interrupted") and attempts[1:] == \
        [(2, "interrupted")], attempts

    def gone(p: psutil.Process) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    left = [p for p in procs if not gone(p)]
    assert not left, [(p.pid, p.cmdline()) for p in left]
    # a person's stop sticks: auto-resume does not bring it back
    time.sleep(4)
    assert db_rows(home, "SELECT status, attempt FROM runs WHERE id = ?", (run_id,)) == \
        [("interrupted", 2)]
