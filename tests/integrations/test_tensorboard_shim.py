"""An unmodified TensorBoard script, with only its import changed, logs the same values into ckptd.

The same script runs twice: once with ``torch.utils.tensorboard`` (read back
with TensorBoard's own ``EventAccumulator``), once with
``ckptd_client.tensorboard`` (read back with ``ckptd metrics --format jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ckptd, run_script

pytest.importorskip("tensorboard")

SCRIPT = """
import math, sys
import torch
{import_line}

writer = SummaryWriter(log_dir=sys.argv[1])
torch.manual_seed(0)
w = torch.zeros(3, requires_grad=True)
opt = torch.optim.SGD([w], lr=0.1)
for step in range(25):
    loss = ((w - torch.arange(3.0)) ** 2).sum() + 0.01 * step
    opt.zero_grad(); loss.backward(); opt.step()
    writer.add_scalar("train/loss", loss, step)           # a 0-d tensor
    writer.add_scalar("train/lr", 0.1 * math.cos(step / 10), global_step=step)
    if step % 5 == 0:
        writer.add_scalars("w", {{"a": w[0].item(), "b": float(w[1])}}, step)
        writer.add_text("note", f"at step {{step}}", step)
writer.add_histogram("weights", w.detach(), 24)           # not recorded by ckptd: ignored
writer.add_hparams({{"lr": 0.1, "opt": "sgd"}}, {{"hp/final": loss.item()}})
writer.flush()
writer.close()
"""


def _tensorboard_values(logdir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[tuple[str, int], float] = {}
    # add_scalars and add_hparams write sub-runs (folders); each is one accumulator
    for d in sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(d))
        acc.Reload()
        prefix = d.relative_to(logdir).parts
        for tag in acc.Tags()["scalars"]:
            for ev in acc.Scalars(tag):
                # add_scalars("w", {"a": ..}) lands in folder w_a with tag "w": name it w/a
                key = tag if not prefix or prefix[0].count("_") == 0 or tag.startswith("hp/") \
                    else f"{tag}/{prefix[0].split('_', 1)[1]}"
                out[(key, ev.step)] = ev.value
    return out


def test_tensorboard_script_with_one_import_changed_logs_the_same_values(
        home: Path, tmp_path: Path) -> None:
    tb_dir = tmp_path / "tb"
    run_script(home, SCRIPT.format(
        import_line="from torch.utils.tensorboard import SummaryWriter"), args=[str(tb_dir)])
    expected = _tensorboard_values(tb_dir)
    assert ("train/loss", 24) in expected and ("w/a", 5) in expected, expected.keys()

    proc = run_script(home, SCRIPT.format(
        import_line="from ckptd_client.tensorboard import SummaryWriter"),
        args=[str(tmp_path / "shim")])
    assert "add_histogram is not recorded" in proc.stderr
    rows = [json.loads(line) for line in
            ckptd(home, "metrics", "--format", "jsonl", check=True).stdout.splitlines()]
    got = {(r["key"], r["step"]): r["value"] for r in rows}
    assert set(got) == set(expected)
    import numpy as np

    # TensorBoard stores scalars as float32; ckptd keeps the full double
    for k, v in expected.items():
        assert np.float32(got[k]) == np.float32(v), (k, got[k], v)
    show = json.loads(ckptd(home, "show", "--json", check=True).stdout)
    assert show["name"] == "shim" and show["status"] == "finished"
    tail = ckptd(home, "tail", "-n", "100", check=True).stdout
    assert "at step 20" in tail and "hparams" in tail and "opt=sgd" in tail, tail
