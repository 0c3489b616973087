"""The daemon killed -9 inside the commit of an asynchronous DCP checkpoint
(rank 0's background ``dcp_commit`` RPC), at each point of the crash-marked
protocol: no torn step is ever visible, the restarted daemon removes the
staging directory or records the whole step exactly once, training is not
killed, and the next checkpoint works with the daemon auto-started again.

Real processes: ``torchrun --standalone`` with two gloo ranks on CPU, a real
daemon that SIGKILLs itself at a named point (``CKPTD_CRASH_AT``, see
``ckptd/daemon/crashpoints.py``); the daemon the trainer auto-starts has no
crash point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DaemonProc, ckptd, db_rows, env_for

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

STEPS = 14
SCRIPT = """
import json, sys, time, torch, torch.distributed as dist, ckptd_client as ckptd
dist.init_process_group("gloo")
run = ckptd.init(name="dcp-daemon-kill")
state = {"w": torch.zeros(1 << 16), "step": -1}
outcome = {}
for step in range(STEPS):
    state["w"].fill_(float(step)); state["step"] = step
    run.log({"loss": float(step)}, step=step)
    if step in (3, 7, 11):
        handle = run.checkpoint(state, step=step)
        try:
            outcome[step] = handle.wait()["step"]
        except ckptd.CheckpointError as exc:
            outcome[step] = "failed: " + str(exc)
    time.sleep(0.05)
with open(f"{sys.argv[1]}/rank{run.rank}.json", "w") as f:
    json.dump(outcome, f)
run.finish()
dist.destroy_process_group()
""".replace("STEPS", str(STEPS))


@pytest.mark.parametrize("point", [  # the two that failed before the fix; the rest --long
    "ckpt.before_rename", "ckpt.after_rename",
    pytest.param("ckpt.before_row", marks=pytest.mark.slow),
    pytest.param("ckpt.after_row", marks=pytest.mark.slow)])
def test_daemon_kill9_inside_an_async_dcp_commit(home: Path, tmp_path: Path,
                                                 point: str) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    daemon = DaemonProc(home, env=env_for(home, CKPTD_CRASH_AT=point))
    daemon.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc-per-node=2", os.fspath(script), os.fspath(tmp_path)],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,
            env=env_for(home, OMP_NUM_THREADS="1"), stdin=subprocess.DEVNULL)
        # training is not killed: every rank ran its loop to the end
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert daemon.proc is not None and daemon.proc.poll() == -9, "no crash at " + point
        outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert outcomes[0] == outcomes[1], outcomes  # every rank learns the same outcome
        # the commit of step 3 died with the daemon: its handle says so ...
        assert str(outcomes[0]["3"]).startswith("failed: "), outcomes
        # ... and the next checkpoints work with the auto-started daemon
        assert (outcomes[0]["7"], outcomes[0]["11"]) == (7, 11), outcomes
        [run_id] = [r["id"] for r in json.loads(ckptd(home, "ls", "--json",
                                                      check=True).stdout)]
        assert db_rows(home, "SELECT MAX(step) FROM metrics WHERE run_id = ? AND rank = 1",
                       (run_id,)) == [(STEPS - 1,)]
        assert db_rows(home, "SELECT status FROM runs WHERE id = ?", (run_id,)) == \
            [("finished",)]
        rows = db_rows(home, "SELECT step, status FROM checkpoints WHERE run_id = ? ORDER BY"
                             " step", (run_id,))
        # before the rename: the step never becomes visible (the staging directory
        # is removed at the restart); after it: recorded once, whole
        step3 = [] if point == "ckpt.before_rename" else [(3, "committed")]
        assert rows == step3 + [(7, "committed"), (11, "committed")], rows
        ckpts = home / "runs" / run_id / "checkpoints"
        # nothing else on disk: no staging leftover, no torn step, no commit record
        names = sorted(p.name for p in ckpts.iterdir())
        assert names == sorted(f"step-{s}" for s, _ in rows), names
        verify = ckptd(home, "ckpt", "verify", run_id)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        daemon.stop()
