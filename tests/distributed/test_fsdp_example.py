"""examples/train_fsdp.py: FSDP2 (``fully_shard``) on CPU with gloo, resumable bit for bit.

Real processes: torchrun with two ranks (four with --long), a real daemon, a
real SIGKILL of the last rank inside the collective checkpoint of step 14 (after
its shard is durable), then TorchElastic's restart resumes from step 9.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import db_rows, env_for

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2 in this torch")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_fsdp.py"


def train(home: Path, out: Path, *extra: str, nproc: int = 2,
          **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(nproc), *extra, os.fspath(EXAMPLE), "--steps", "20", "--ckpt-every", "5", "--out",
         os.fspath(out)], capture_output=True, text=True, timeout=240,
        env=env_for(home, OMP_NUM_THREADS="1", **env), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


# 4 ranks (--long): FSDP2 has no DDP-style bucket rebuild, bit-identical as it is
@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_fsdp2_killed_rank_resumes_bit_identical(home: Path, daemon, tmp_path: Path,
                                                 nproc: int) -> None:
    clean, broken = tmp_path / "clean.pt", tmp_path / "broken.pt"
    train(home, clean, nproc=nproc)
    [(first,)] = db_rows(home, "SELECT id FROM runs")
    proc = train(home, broken, "--max-restarts", "2", nproc=nproc,
                 CKPTD_TEST_KILL_DCP=f"{nproc - 1}:14")
    assert "resumed after step 9" in proc.stdout, proc.stdout
    [(run_id,)] = db_rows(home, "SELECT id FROM runs WHERE id != ?", (first,))
    attempts = db_rows(home, "SELECT attempt, status, restored_step FROM attempts WHERE"
                             " run_id = ? ORDER BY attempt", (run_id,))
    assert attempts[1][2] == 9 and attempts[-1][1] == "finished", attempts
    a, b = torch.load(clean, weights_only=True), torch.load(broken, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the sharded optimizer state restored too: the losses after the resume are the same
    losses = [db_rows(home, "SELECT step, value FROM effective_metrics WHERE run_id = ? AND"
                            " key = 'loss' AND rank = 0 ORDER BY step", (r,))
              for r in (first, run_id)]
    assert losses[0] == losses[1] and len(losses[0]) == 20
