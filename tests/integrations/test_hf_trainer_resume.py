"""Hugging Face ``Trainer`` through ``ckptd_client.hf``: a tiny GPT-2 built from a
config (nothing downloaded) is killed with kill -9 at a random step, resumes
from the newest adopted ``checkpoint-N``, and ends at the same weights as an
uninterrupted run; every adopted folder verifies; a byte flipped in the
newest makes the next resume fall back to the previous one and say why.
``CKPTD_TEST_SEED`` replays a kill step."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
from helpers import DaemonProc, ckptd, db_rows, env_for, run_script, spawn_script

pytest.importorskip("transformers", reason="needs pip install 'ckptd[hf]'")

SAVE_STEPS, MAX_STEPS = 3, 12

TRAIN = f"""
import os, sys, time, torch
from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                          TrainingArguments)
from ckptd_client.hf import CkptdCallback

out, kill_at = sys.argv[1], int(sys.argv[2])

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == kill_at:
            time.sleep(0.2)  # the adoption of the last save has been sent to the daemon
            os.kill(os.getpid(), 9)  # kill -9: no handler, no flush, no atexit

class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (96, 16), generator=torch.Generator().manual_seed(1))
    def __len__(self):
        return len(self.ids)
    def __getitem__(self, i):
        return {{"input_ids": self.ids[i], "labels": self.ids[i]}}

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64,
                                   n_positions=16))
args = TrainingArguments(output_dir=out, max_steps={MAX_STEPS}, save_steps={SAVE_STEPS},
                         logging_steps=1, save_total_limit=2, per_device_train_batch_size=8,
                         learning_rate=1e-3, seed=0, report_to=[], use_cpu=True,
                         disable_tqdm=True, dataloader_num_workers=0)
cb = CkptdCallback(name="hf", retention={{"latest": 2}})
print("RUN", cb.run.id, flush=True)
trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[cb, Kill()])
path = cb.resume_path()
print("FROM", path, flush=True)
trainer.train(resume_from_checkpoint=path)
torch.save(model.state_dict(), out + "/final.pt")
"""


def test_killed_hf_run_resumes_and_falls_back_past_a_damaged_checkpoint(
        home: Path, daemon: DaemonProc, tmp_path: Path) -> None:
    import torch

    seed = int(os.environ.get("CKPTD_TEST_SEED") or random.randrange(1 << 30))
    kill_at = random.Random(seed).randrange(SAVE_STEPS + 1, MAX_STEPS)
    print(f"CKPTD_TEST_SEED={seed}: kill -9 at global step {kill_at}")
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    env = env_for(home, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    ref = spawn_script(home, TRAIN.replace("out, kill_at = sys.argv[1], int(sys.argv[2])",
                                           f"out, kill_at = {str(ref_out)!r}, -1"), env=env)
    killed = run_script(home, TRAIN, check=False, env=env, args=[os.fspath(out), str(kill_at)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_id = killed.stdout.split("RUN ")[1].split()[0]
    ref_stdout, ref_stderr = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_stderr[-3000:]
    ref_id = ref_stdout.split("RUN ")[1].split()[0]

    def attempt(n: int) -> tuple[str, str]:
        proc = run_script(home, TRAIN, args=[os.fspath(out), "-1"],
                          env={**env, "CKPTD_RUN_ID": run_id, "CKPTD_ATTEMPT": str(n)})
        return proc.stdout.split("FROM ")[1].split()[0], proc.stderr

    ckpts = home / "runs" / run_id / "checkpoints"
    last = kill_at - 1 - (kill_at - 1) % SAVE_STEPS   # newest save before the kill
    path, _ = attempt(2)
    assert path == f"{ckpts}/step-{last}/adopted/checkpoint-{last}"
    a = torch.load(ref_out / "final.pt", weights_only=True)
    b = torch.load(out / "final.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (seed {seed})"

    # everything Trainer logged, at its steps; the resumed timeline is the reference's
    def points(rid: str) -> list[tuple[int, str]]:
        return [tuple(r) for r in db_rows(
            home, "SELECT step, key FROM effective_metrics WHERE run_id = ? AND src GLOB 'c*'"
            " AND key NOT LIKE 'train_%' ORDER BY step, key", (rid,))]
    assert points(run_id) == points(ref_id)
    assert {k for _, k in points(ref_id)} >= {"loss", "learning_rate", "grad_norm", "epoch"}
    assert [s for s, k in points(ref_id) if k == "loss"] == list(range(1, MAX_STEPS + 1))
    hp = db_rows(home, "SELECT fields FROM events WHERE run_id = ? AND message = 'hparams'",
                 (ref_id,))
    assert json.loads(hp[0][0])["save_steps"] == SAVE_STEPS

    # the adopted folders verify; retention kept the newest two
    verified = ckptd(home, "ckpt", "verify", run_id, check=True).stdout
    assert f"ok       step {MAX_STEPS}" in verified, verified
    newest = ckpts / f"step-{MAX_STEPS}" / "adopted" / f"checkpoint-{MAX_STEPS}"
    with open(newest / "model.safetensors", "r+b") as f:   # one flipped byte in the newest
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    path, stderr = attempt(3)
    previous = MAX_STEPS - SAVE_STEPS
    assert path == f"{ckpts}/step-{previous}/adopted/checkpoint-{previous}", stderr[-2000:]
    assert f"skipped checkpoint step {MAX_STEPS}" in stderr and "model.safetensors" in stderr
    assert "hash" in stderr
