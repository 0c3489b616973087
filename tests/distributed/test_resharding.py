"""Resharding: a checkpoint written by 4 ranks restores into 2 (DCP reshards),
the run continues, and the step directory loads with plain
``torch.distributed.checkpoint.load`` outside ckptd. (2 -> 1 is in
test_distributed.py.) Real ``torchrun`` processes, gloo on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ckptd, env_for, run_script

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_ddp.py"


def torchrun(home: Path, nproc: int, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", os.fspath(EXAMPLE), *args],
        capture_output=True, text=True, timeout=300, cwd=home.parent,
        env=env_for(home, OMP_NUM_THREADS="1", **env), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc


def losses(home: Path, run_id: str) -> dict[int, float]:
    rows = ckptd(home, "metrics", run_id, "--format", "jsonl", check=True).stdout
    return {r["step"]: r["value"] for r in map(json.loads, rows.splitlines())}


@pytest.mark.parametrize("world,steps", [
    (4, 10), pytest.param(4, 40, marks=pytest.mark.slow)])
def test_four_ranks_checkpoint_restores_into_two(home: Path, daemon, tmp_path: Path,
                                                 world: int, steps: int) -> None:
    shared = tmp_path / "shared"
    final4 = tmp_path / "final4.pt"
    torchrun(home, world, "--steps", str(steps), "--ckpt-every", "5", "--out",
             os.fspath(final4), CKPTD_CHECKPOINT_DIR=os.fspath(shared))
    [run] = json.loads(ckptd(home, "ls", "--json", check=True).stdout)
    assert run["world_size"] == world
    last = steps - 1
    step_dir = shared / run["id"] / f"step-{last}"
    names = {p.name for p in step_dir.iterdir()}
    assert {f"__{r}_0.distcp" for r in range(world)} <= names, names
    # plain torch.distributed.checkpoint.load, no ckptd, no process group
    code = f"""
import torch, torch.distributed.checkpoint as dcp
ref = torch.load({os.fspath(final4)!r}, weights_only=True)
sd = {{"model": {{k: torch.zeros_like(v) for k, v in ref.items()}}, "step": -1}}
dcp.load(sd, checkpoint_id={os.fspath(step_dir)!r})
assert sd["step"] == {last}, sd["step"]
assert all(torch.equal(sd["model"][k], ref[k]) for k in ref)
print("plain load ok")
"""
    assert "plain load ok" in run_script(home, code).stdout
    # the job comes back on 2 ranks: the same run, resharded, and it goes on
    final2 = tmp_path / "final2.pt"
    proc = torchrun(home, 2, "--steps", str(steps + 10), "--ckpt-every", "5", "--out",
                    os.fspath(final2), CKPTD_CHECKPOINT_DIR=os.fspath(shared),
                    CKPTD_RUN_ID=run["id"], CKPTD_ATTEMPT="2")
    assert f"resumed after step {last}" in proc.stdout, proc.stdout
    curve = losses(home, run["id"])
    assert sorted(curve) == list(range(steps + 10))  # one curve, no gap, no repeat
    # continuing, not starting over: the first resumed loss is near the last
    # ones before the checkpoint, far below the untrained model's
    before = [curve[s] for s in range(last - 2, last + 1)]
    assert curve[steps] < curve[0] / 2 and curve[steps] < 2 * max(before), curve
    [run] = json.loads(ckptd(home, "ls", "--json", check=True).stdout)
    assert (run["world_size"], run["status"], run["attempt"]) == (2, "finished", 2), run
    ckpts = json.loads(ckptd(home, "ckpt", "ls", run["id"], "--json", check=True).stdout)
    assert ckpts[-1]["step"] == steps + 9 and ckpts[-1]["status"] == "committed", ckpts
    verify = ckptd(home, "ckpt", "verify", run["id"])
    assert verify.returncode == 0, verify.stdout + verify.stderr
