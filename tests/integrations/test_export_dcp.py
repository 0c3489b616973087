"""``ckptd ckpt export --format dcp``: a native step becomes a directory that plain
``torch.distributed.checkpoint.load`` reads without a process group; a DCP step
is copied out with every hash checked; ``--format torch`` of a DCP step is its
whole state. Real torch, real DCP, round trips compared tensor by tensor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import DaemonProc, ckptd, run_script

torch = pytest.importorskip("torch")

#: Model + Adam after one step: tensors, nested dicts, lists and plain numbers.
MAKE_STATE = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model(torch.randn(5, 8)).sum().backward()
opt.step()
state = {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 3}
"""

NATIVE = MAKE_STATE + """
import sys, ckptd_client as ckptd
run = ckptd.init(name="native")
run.checkpoint(state, step=3).wait(60)
torch.save(state, sys.argv[1])
print(run.id)
run.finish()
"""

#: One process in a gloo group of one: ``run.checkpoint`` writes a DCP step.
SHARDED = MAKE_STATE + """
import sys, torch.distributed as dist, ckptd_client as ckptd
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
run = ckptd.init(name="sharded")
run.checkpoint(state, step=5).wait(60)
torch.save(state, sys.argv[1])
print(run.id)
run.finish()
dist.destroy_process_group()
"""

#: Plain DCP, no ckptd and no process group: load into a freshly made state.
LOAD = MAKE_STATE.replace("torch.manual_seed(0)", "torch.manual_seed(1)") + """
import sys, warnings, torch.distributed.checkpoint as dcp
state["epoch"] = 0
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    dcp.load(state, checkpoint_id=sys.argv[1])
torch.save(state, sys.argv[2])
"""


def assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a, b)
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def load_plainly(home: Path, ckpt_dir: Path, out: Path) -> dict:
    run_script(home, LOAD, args=[os.fspath(ckpt_dir), os.fspath(out)])
    return torch.load(out, weights_only=True)


@pytest.fixture
def dhome(home: Path) -> Path:
    d = DaemonProc(home)
    d.start()
    try:
        yield home
    finally:
        d.stop()


def test_native_step_exports_to_a_dcp_directory_plain_dcp_loads(dhome: Path,
                                                                  tmp_path: Path) -> None:
    ref = tmp_path / "ref.pt"
    run_id = run_script(dhome, NATIVE, args=[os.fspath(ref)]).stdout.split()[-1]
    out = tmp_path / "exported"
    proc = ckptd(dhome, "ckpt", "export", run_id, "--format", "dcp", "-o", os.fspath(out))
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {".metadata", "__0_0.distcp", "ckptd-export.json"} <= names, names
    assert not (tmp_path / "exported.ckptd-tmp").exists()
    assert_same(torch.load(ref, weights_only=True), load_plainly(dhome, out, tmp_path / "l.pt"))

    again = ckptd(dhome, "ckpt", "export", run_id, "--format", "dcp", "-o", os.fspath(out))
    assert again.returncode != 0 and "not an empty directory" in again.stderr
    assert "Traceback" not in again.stderr


def test_dcp_step_copies_out_verified_and_exports_to_torch(dhome: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref.pt"
    run_id = run_script(dhome, SHARDED, args=[os.fspath(ref), os.fspath(tmp_path / "pg")],
                        ).stdout.split()[-1]
    step_dir = dhome / "runs" / run_id / "checkpoints" / "step-5"
    assert (step_dir / ".metadata").exists() and (step_dir / "__0_0.distcp").exists()
    expected = torch.load(ref, weights_only=True)

    out = tmp_path / "copy"
    ckptd(dhome, "ckpt", "export", run_id, "--format", "dcp", "-o", os.fspath(out), check=True)
    for name in (".metadata", "__0_0.distcp", "ckptd-rng-0.pt"):
        assert (out / name).read_bytes() == (step_dir / name).read_bytes(), name
    assert_same(expected, load_plainly(dhome, out, tmp_path / "l.pt"))

    pt = tmp_path / "whole.pt"
    ckptd(dhome, "ckpt", "export", run_id, "--format", "torch", "-o", os.fspath(pt),
          check=True)
    obj = torch.load(pt, weights_only=True)
    assert obj["step"] == 5 and obj["run"] == run_id and obj["rng"] is not None
    assert_same(expected, obj["state"])

    # a flipped byte in a shard: no export, one line naming the file
    with open(step_dir / "__0_0.distcp", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    bad_out = tmp_path / "bad"
    bad = ckptd(dhome, "ckpt", "export", run_id, "--step", "5", "--format", "dcp", "-o",
                os.fspath(bad_out))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert str(step_dir / "__0_0.distcp") in bad.stderr and len(bad.stderr.splitlines()) == 1
    assert not bad_out.exists() and not (tmp_path / "bad.ckptd-tmp").exists()
