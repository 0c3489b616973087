"""``run.adopt_checkpoint``: a framework's own checkpoint folder becomes a verified,
retained ckptd checkpoint, and a byte flipped in the newest makes the next attempt
fall back to the previous one and say why."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import DaemonProc, ckptd, db_rows, env_for, run_script

TRAIN = """
import json, os, torch, ckptd_client as ckptd
run = ckptd.init(name="adopted", retention={"latest": 2})
for step in (10, 20, 30):
    d = f"out/checkpoint-{step}"            # what a framework writes, its own layout
    os.makedirs(d + "/optim", exist_ok=True)
    torch.save({"w": torch.full((3000,), float(step))}, d + "/model.pt")
    torch.save({"lr": 0.1 * step}, d + "/optim/state.pt")
    with open(d + "/trainer_state.json", "w") as f:
        json.dump({"global_step": step}, f)
    r = run.adopt_checkpoint(d, step, metrics={"loss": 1.0 / step}).wait(60)
    print(json.dumps(r))
print(run.id)
run.finish()
"""

RESUME = """
import torch, ckptd_client as ckptd
run = ckptd.init()
path = run.latest_checkpoint_path()
print("PATH", path)
print("W", float(torch.load(path + "/model.pt", weights_only=True)["w"][0]))
print("RESTORED", run.restored_step)
run.finish()
"""


def test_adopted_folders_verify_retain_and_fall_back(home: Path, daemon: DaemonProc) -> None:
    out = run_script(home, TRAIN).stdout.split("\n")
    run_id = [line for line in out if line.strip()][-1]
    results = [json.loads(line) for line in out if line.startswith("{")]
    assert [r["step"] for r in results] == [10, 20, 30]
    ckpts = home / "runs" / run_id / "checkpoints"
    # the copy is whole: every file, under the step's folder
    adopted = ckpts / "step-30" / "adopted" / "checkpoint-30"
    assert results[-1]["path"] == str(adopted)
    assert json.loads((adopted / "trainer_state.json").read_text()) == {"global_step": 30}
    assert (adopted / "optim" / "state.pt").stat().st_size > 0
    # retention applies to adopted checkpoints: latest 2 kept
    listed = json.loads(ckptd(home, "ckpt", "ls", run_id, "--json", check=True).stdout)
    assert [c["step"] for c in listed] == [20, 30]
    assert listed[-1]["metrics"] == {"loss": 1.0 / 30}
    assert not (ckpts / "step-10").exists()

    env = env_for(home, CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT="2")
    ok = run_script(home, RESUME, env=env).stdout
    assert f"PATH {adopted}" in ok and "W 30.0" in ok and "RESTORED 30" in ok

    with open(adopted / "model.pt", "r+b") as f:   # one flipped byte in the newest
        f.seek(700)
        b = f.read(1)
        f.seek(700)
        f.write(bytes([b[0] ^ 0x10]))
    proc = run_script(home, RESUME, env=env_for(home, CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT="3"))
    assert f"PATH {ckpts / 'step-20' / 'adopted' / 'checkpoint-20'}" in proc.stdout
    assert "W 20.0" in proc.stdout and "RESTORED 20" in proc.stdout
    assert "skipped checkpoint step 30" in proc.stderr and "model.pt" in proc.stderr
    assert "fails its sha256 hash" in proc.stderr or "hash" in proc.stderr
    events = db_rows(home, "SELECT message FROM events WHERE run_id = ? AND attempt = 3"
                     " AND level = 'warning'", (run_id,))
    assert any("skipped checkpoint step 30" in m for (m,) in events), events


def test_adopting_a_missing_path_is_a_clear_error(home: Path, daemon: DaemonProc) -> None:
    proc = run_script(home, """
import ckptd_client as ckptd
run = ckptd.init(name="missing")
try:
    run.adopt_checkpoint("/nonexistent/ckpt", 5)
except ckptd.CheckpointError as exc:
    print("ERR", exc)
run.finish()
""")
    assert "ERR adopt /nonexistent/ckpt: no such file or folder" in proc.stdout
