"""Asynchronous collective (DCP) checkpoints: the loop waits only for the snapshot.

Real processes: ``python -m torch.distributed.run`` with gloo on CPU, a real
daemon, a real SIGKILL of one rank while its shard is being written in the
background.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ckptd, db_rows, env_for

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_ddp.py"


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node=2", f"--max-restarts={restarts}", *args]


def launch(home: Path, argv: list[str], timeout: float = 180,
           **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=env_for(home, OMP_NUM_THREADS="1", **env), cwd=home.parent,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_ids(home: Path) -> list[str]:
    return [r["id"] for r in json.loads(ckptd(home, "ls", "--json", check=True).stdout)]


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def test_kill9_rank_while_its_shard_is_written_in_the_background(home: Path, daemon,
                                                                  tmp_path: Path) -> None:
    """Rank 1 is killed mid-write of its step-14 shard, after its training loop
    went on to log step 15 (so checkpoint() had returned): step 14 never
    becomes visible, the restart resumes from step 9, and the final weights
    equal an uninterrupted run's."""
    args = ["--steps", "20", "--ckpt-every", "5"]
    clean, broken = tmp_path / "clean.pt", tmp_path / "broken.pt"
    launch(home, torchrun(os.fspath(EXAMPLE), *args, "--out", os.fspath(clean)))
    [first] = run_ids(home)
    proc = launch(home, torchrun(os.fspath(EXAMPLE), *args, "--out", os.fspath(broken),
                                 restarts=2), CKPTD_TEST_KILL_DCP="1:14:write")
    assert "resumed after step 9" in proc.stdout, proc.stdout
    [run_id] = [r for r in run_ids(home) if r != first]
    attempts = db_rows(home, "SELECT attempt, status, restored_step FROM attempts WHERE"
                             " run_id = ? ORDER BY attempt", (run_id,))
    assert attempts[0][1] in ("failed", "interrupted"), attempts
    assert attempts[1][2] == 9 and attempts[-1][1] == "finished", attempts
    # the loop of rank 1 ran on past the checkpoint while its shard was being written
    (last,) = db_rows(home, "SELECT MAX(step) FROM metrics WHERE run_id = ? AND attempt = 1"
                            " AND rank = 1", (run_id,))[0]
    assert last is not None and last >= 15, last
    # step 14 of attempt 1 never became visible; the next attempt wrote it whole
    assert db_rows(home, "SELECT attempt FROM checkpoints WHERE run_id = ? AND step = 14",
                   (run_id,)) == [(attempts[-1][0],)]
    verify = ckptd(home, "ckpt", "verify", run_id)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert_same_weights(clean, broken)


SEMANTICS = """
import sys, torch, torch.distributed as dist, ckptd_client as ckptd
dist.init_process_group("gloo")
run = ckptd.init(name="async-semantics")
state = {"w": torch.zeros(1 << 20), "step": 0}
h0 = run.checkpoint(state, step=0)
state["w"].fill_(1.0); state["step"] = 1  # after return: step 0's snapshot is taken
h1 = run.checkpoint(state, step=1)        # waits for step 0 first
assert h0.done() and h0.wait()["step"] == 0
state["w"].fill_(7.0); state["step"] = 7
assert run.restore(into=state) is state    # waits for step 1's commit, loads it
with open(f"{sys.argv[1]}/rank{run.rank}.txt", "w") as f:  # ranks share stdout
    print(run.restored_step, float(state["w"].sum()), state["step"], h1.done(), file=f)
run.checkpoint(state, step=2)              # not waited for: finish() does
run.finish()
dist.destroy_process_group()
"""


def test_checkpoint_in_flight_is_snapshotted_queued_restored_and_finished(
        home: Path, daemon, tmp_path: Path) -> None:
    """What changes after checkpoint() returns is not in the step; a second
    checkpoint waits for the first; restore() waits for the one in flight;
    finish() commits the last one before the process group is destroyed."""
    script = tmp_path / "semantics.py"
    script.write_text(SEMANTICS)
    launch(home, torchrun(os.fspath(script), os.fspath(tmp_path)))
    n = 1 << 20
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text().split() == ["1", str(float(n)), "1",
                                                                   "True"]
    [run_id] = run_ids(home)
    rows = db_rows(home, "SELECT step FROM checkpoints WHERE run_id = ? AND status ="
                         " 'committed' ORDER BY step", (run_id,))
    assert rows == [(0,), (1,), (2,)]
    # step 0 holds the values at the call (zeros), read by plain DCP
    code = f"""
import torch, torch.distributed.checkpoint as dcp
sd = {{"w": torch.full(({n},), 5.0), "step": -1}}
dcp.load(sd, checkpoint_id={os.fspath(home / "runs" / run_id / "checkpoints" / "step-0")!r})
print(float(sd["w"].abs().sum()), sd["step"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env_for(home), check=True).stdout
    assert out.split() == ["0.0", "0"], out
