"""``ckptd ckpt export --format safetensors`` loads with ``safetensors.torch.load_file``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import DaemonProc, ckptd, run_script

st = pytest.importorskip("safetensors.torch")


def test_safetensors_export_loads_with_the_same_tensors(home: Path, daemon: DaemonProc,
                                                        tmp_path: Path) -> None:
    import torch

    run_script(home, """
import torch, ckptd_client as ckptd
run = ckptd.init(name="st")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
opt = torch.optim.Adam(model.parameters())
model(torch.randn(5, 4)).sum().backward(); opt.step()
torch.save(model.state_dict(), "model.pt")
run.checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": 3,
                "tag": "best"}, step=7, metrics={"val": 0.5}).wait(30)
run.finish()
""")
    out = tmp_path / "m.safetensors"
    ckptd(home, "ckpt", "export", "st", "--format", "safetensors", "-o", str(out), check=True)
    loaded = st.load_file(str(out))
    model = torch.load(home.parent / "model.pt", weights_only=True)
    for k, v in model.items():
        assert torch.equal(loaded[f"model.{k}"], v), k
    assert "opt.state.0.exp_avg" in loaded
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "7" and json.loads(meta["metrics"]) == {"val": 0.5}
    extra = json.loads(meta["ckptd.extra"])
    assert extra["epoch"] == 3 and extra["tag"] == "best" and extra["opt.param_groups.0.lr"]

    bad = ckptd(home, "ckpt", "export", "st", "--format", "onnx", "-o", str(out))
    assert bad.returncode != 0 and "is not one of torch, safetensors" in bad.stderr
    plain = tmp_path / "m.pt"
    ckptd(home, "ckpt", "export", "st", "-o", str(plain), check=True)  # the default is unchanged
    assert torch.equal(torch.load(plain, weights_only=True)["state"]["model"]["0.weight"],
                       model["0.weight"])
