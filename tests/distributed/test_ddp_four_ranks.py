"""More than two DDP ranks resume bit for bit (``settle_ddp_buckets``).

DDP rebuilds its gradient buckets after its first backward; with 3+ ranks the
ring allreduce's sum of an element depends on its place in the bucket, so a
resumed run (a new DDP, first layout at its first step) drifted ~1e-8 from an
uninterrupted one unless the buckets are settled before step 0 in both.
Real processes: torchrun with four gloo ranks on CPU, a real daemon, a real
SIGKILL of rank 3 inside the collective checkpoint of step 14.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import db_rows, env_for

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_ddp.py"


def torchrun(home: Path, *args: str, timeout: float = 240,
             **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "4", *args], capture_output=True, text=True, timeout=timeout,
        env=env_for(home, OMP_NUM_THREADS="1", **env), cwd=home.parent,
        stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def losses(home: Path, run_id: str) -> dict[int, list[tuple[int, float]]]:
    rows = db_rows(home, "SELECT rank, step, value FROM effective_metrics WHERE run_id = ? AND"
                         " key = 'loss' ORDER BY rank, step", (run_id,))
    out: dict[int, list[tuple[int, float]]] = {}
    for rank, step, value in rows:
        out.setdefault(rank, []).append((step, value))
    return out


def test_four_ranks_kill9_elastic_restart_is_bit_identical(home: Path, daemon,
                                                           tmp_path: Path) -> None:
    clean, broken = tmp_path / "clean.pt", tmp_path / "broken.pt"
    args = [os.fspath(EXAMPLE), "--steps", "20", "--ckpt-every", "5"]
    torchrun(home, *args, "--out", os.fspath(clean))
    [(first,)] = db_rows(home, "SELECT id FROM runs")
    proc = torchrun(home, "--max-restarts", "2", *args, "--out", os.fspath(broken),
                    CKPTD_TEST_KILL_DCP="3:14")
    assert "resumed after step 9" in proc.stdout, proc.stdout
    [(run_id,)] = db_rows(home, "SELECT id FROM runs WHERE id != ?", (first,))
    attempts = db_rows(home, "SELECT attempt, status, restored_step FROM attempts WHERE"
                             " run_id = ? ORDER BY attempt", (run_id,))
    assert attempts[1][2] == 9 and attempts[-1][1] == "finished", attempts
    a, b = torch.load(clean, weights_only=True), torch.load(broken, weights_only=True)
    assert a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert all(torch.equal(a[k], b[k]) for k in a), diff
    # every rank's loss curve, not only rank 0's (the drift showed first on rank 3)
    want, got = losses(home, first), losses(home, run_id)
    assert sorted(want) == [0, 1, 2, 3] and all(len(v) == 20 for v in want.values()), want
    assert got == want


SETTLE_SCRIPT = """
import copy, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from ckptd_client.distributed import settle_ddp_buckets

dist.init_process_group("gloo")
rank = dist.get_rank()

def new_ddp(weights=None):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64),
                            torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    if weights is not None:
        m.load_state_dict(weights)
    d = DDP(m)
    rng, bufs = torch.get_rng_state(), copy.deepcopy(list(d.buffers()))
    settle_ddp_buckets(d, torch.zeros(2, 16))
    # no trace: RNG, BatchNorm statistics, gradients as they were
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(bufs, d.buffers()))
    assert all(p.grad is None for p in d.parameters())
    return d

def train(d, opt, steps):
    for step in steps:
        g = torch.Generator().manual_seed(step * 1000 + rank)
        x = torch.randn(32, 16, generator=g)
        loss = torch.nn.functional.mse_loss(d(x), x.sin().sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()

torch.manual_seed(1 + rank)  # dropout's RNG, per rank
d = new_ddp(); opt = torch.optim.Adam(d.parameters(), lr=1e-2)
train(d, opt, range(12))
full = copy.deepcopy(d.module.state_dict())

torch.manual_seed(1 + rank)
d = new_ddp(); opt = torch.optim.Adam(d.parameters(), lr=1e-2)
train(d, opt, range(6))
saved = copy.deepcopy((d.module.state_dict(), opt.state_dict(), torch.get_rng_state()))
d = new_ddp(saved[0])  # the resume: a new DDP
opt = torch.optim.Adam(d.parameters(), lr=1e-2)
opt.load_state_dict(saved[1])
torch.set_rng_state(saved[2])
train(d, opt, range(6, 12))
res = d.module.state_dict()
diff = max((full[k].float() - res[k].float()).abs().max().item() for k in full)
print(f"rank {rank} identical {all(torch.equal(full[k], res[k]) for k in full)} {diff:.3g}",
      flush=True)
dist.destroy_process_group()
"""


def test_settled_ddp_resumed_in_a_new_wrapper_steps_bit_identically(home: Path,
                                                                     tmp_path: Path) -> None:
    """The helper alone, without a daemon: BatchNorm and dropout included."""
    script = tmp_path / "settle.py"
    script.write_text(SETTLE_SCRIPT)
    out = torchrun(home, os.fspath(script), timeout=120).stdout
    # four processes print to one pipe: a line may land glued to another's
    said = sorted(re.findall(r"rank (\d) identical (True|False) ", out + " "))
    assert [r for r, _ in said] == ["0", "1", "2", "3"], out
    assert all(same == "True" for _, same in said), out


def test_settle_refuses_a_model_whose_output_needs_no_grad() -> None:
    from ckptd_client.distributed import settle_ddp_buckets
    from ckptd_client.errors import CkptdError

    model = torch.nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(CkptdError, match="no tensor that requires grad"):
        settle_ddp_buckets(model, torch.zeros(1, 2))
