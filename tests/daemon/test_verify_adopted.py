"""Adopted checkpoints (files ckptd did not write: a Lightning ``.ckpt``, a
Hugging Face ``checkpoint-N/`` folder) are re-hashed by ``ckptd ckpt verify``
and by the daemon's reconcile at startup, against the hashes recorded at
adoption: a flipped byte is reported, naming the file."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import DaemonProc, ckptd, db_rows, run_script, wait_for

TRAIN = """
import json, os, torch, ckptd_client as ckptd
run = ckptd.init(name="adopted", retention={"latest": 10})
os.makedirs("lightning", exist_ok=True)
torch.save({"state_dict": {"w": torch.ones(4000)}, "global_step": 10},
           "lightning/epoch=0-step=10.ckpt")       # Lightning: one file
run.adopt_checkpoint("lightning/epoch=0-step=10.ckpt", 10).wait(60)
for step in (20, 30):                               # Hugging Face: a folder
    d = f"hf/checkpoint-{step}"
    os.makedirs(d, exist_ok=True)
    torch.save({"w": torch.full((4000,), float(step))}, d + "/pytorch_model.bin")
    with open(d + "/trainer_state.json", "w") as f:
        json.dump({"global_step": step}, f)
    run.adopt_checkpoint(d, step).wait(60)
print(run.id)
run.finish()
"""


def flip(path: Path, offset: int = 200) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def statuses(home: Path, run_id: str) -> dict[int, tuple[str, str | None]]:
    rows = db_rows(home, "SELECT step, status, reason FROM checkpoints WHERE run_id = ?",
                   (run_id,))
    return {step: (status, reason) for step, status, reason in rows}


def test_verify_and_reconcile_rehash_adopted_files(home: Path) -> None:
    d = DaemonProc(home)
    d.start()
    try:
        run_id = run_script(home, TRAIN).stdout.split()[-1]
        ckpts = home / "runs" / run_id / "checkpoints"
        lightning = ckpts / "step-10" / "adopted" / "epoch=0-step=10.ckpt"
        ok = ckptd(home, "ckpt", "verify", run_id)
        assert ok.returncode == 0, ok.stderr
        assert "3 checkpoint(s)" in ok.stdout

        flip(lightning)
        bad = ckptd(home, "ckpt", "verify", run_id)
        assert bad.returncode != 0
        lines = [line for line in bad.stdout.splitlines() if line.startswith("CORRUPT")]
        assert len(lines) == 1 and "step 10" in lines[0] and str(lightning) in lines[0], \
            bad.stdout
        assert "Traceback" not in bad.stderr and "step 10" in bad.stderr
        assert statuses(home, run_id)[10][0] == "corrupt"
        assert statuses(home, run_id)[30][0] == "committed"

        # with the daemon down: a byte flipped in the newest (re-hashed at start)
        # and a file grown in an older one (its size checked at start)
        d.stop()
        newest = ckpts / "step-30" / "adopted" / "checkpoint-30" / "pytorch_model.bin"
        flip(newest)
        state20 = ckpts / "step-20" / "adopted" / "checkpoint-20" / "trainer_state.json"
        state20.write_text(json.dumps({"global_step": 20000}))
        d.start()
        found = wait_for(lambda: (s := statuses(home, run_id)) and s[30][0] == "corrupt"
                         and s[20][0] == "corrupt" and s, timeout=60,
                         what="reconcile to mark the damaged adopted checkpoints")
        assert str(newest) in found[30][1] and "hash" in found[30][1], found
        assert str(state20) in found[20][1] and "bytes" in found[20][1], found
        log = (home / "daemon.log").read_text()
        assert str(newest) in log
    finally:
        d.stop()
