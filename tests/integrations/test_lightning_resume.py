"""PyTorch Lightning through ``ckptd_client.lightning``: a run killed with
kill -9 at a random step and started again as the next attempt ends with the
same weights as an uninterrupted run (optimizer, scheduler, loop and RNG
state all restored from the adopted checkpoint), and ckptd's effective
timeline holds exactly what Lightning reported (its own ``CSVLogger`` is the
witness). ``CKPTD_TEST_SEED`` replays a kill step."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
from pathlib import Path

import pytest
from helpers import DaemonProc, db_rows, env_for, run_script, spawn_script

pytest.importorskip("lightning", reason="needs pip install 'ckptd[lightning]'")

STEPS_PER_EPOCH, EPOCHS = 8, 4

# dropout and a shuffled loader make a resume that loses the RNG state differ;
# momentum and a per-step scheduler make one that loses optimizer state differ
TRAIN = f"""
import os, sys, torch, lightning as L
from torch import nn
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from ckptd_client.lightning import CkptdLogger

out, kill_at = sys.argv[1], int(sys.argv[2])

class Net(L.LightningModule):
    def __init__(self, lr=0.05, hidden=16):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Dropout(0.2),
                                 nn.Linear(hidden, 1))
    def training_step(self, batch, i):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, on_step=True, on_epoch=True)
        return loss
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
        return {{"optimizer": opt, "lr_scheduler": {{"scheduler": sched, "interval": "step"}}}}

class Kill(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == kill_at:
            os.kill(os.getpid(), 9)          # kill -9: no handler, no flush, no atexit

L.seed_everything(0, workers=True)
g = torch.Generator().manual_seed(1)
x = torch.randn({STEPS_PER_EPOCH * 8}, 8, generator=g)
data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)

logger = CkptdLogger(name="lit", retention={{"latest": 2}})
print("RUN", logger.version, flush=True)
trainer = L.Trainer(max_epochs={EPOCHS}, accelerator="cpu", deterministic=True,
                    logger=[logger, CSVLogger(out)], plugins=[logger.checkpoint_io],
                    callbacks=[ModelCheckpoint(dirpath=out + "/ckpt", save_last=True), Kill()],
                    log_every_n_steps=1, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=out)
trainer.fit(Net(), loader, ckpt_path=logger.resume_path())
torch.save(trainer.lightning_module.state_dict(), out + "/final.pt")
print("RESTORED", logger.experiment.restored_step)
"""


def timeline(home: Path, run_id: str) -> list[tuple[int, str, float]]:
    return [tuple(r) for r in db_rows(
        home, "SELECT step, key, value FROM effective_metrics WHERE run_id = ? AND src GLOB 'c*'"
        " ORDER BY step, attempt, seq, key", (run_id,))]


def csv_points(out: Path) -> list[tuple[int, str, float]]:
    """What Lightning reported, as its own CSVLogger wrote it."""
    [path] = out.glob("lightning_logs/version_*/metrics.csv")
    points = []
    for row in csv.DictReader(path.open()):
        step = int(row.pop("step"))
        points += [(step, k, float(v)) for k, v in row.items() if v != ""]
    return sorted(points)


def test_killed_lightning_run_resumes_to_the_same_weights(home: Path, daemon: DaemonProc,
                                                          tmp_path: Path) -> None:
    import torch

    seed = int(os.environ.get("CKPTD_TEST_SEED") or random.randrange(1 << 30))
    kill_at = random.Random(seed).randrange(2, STEPS_PER_EPOCH * EPOCHS - 1)
    print(f"CKPTD_TEST_SEED={seed}: kill -9 at global step {kill_at}")
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    # the reference and the run that gets killed train side by side
    ref = spawn_script(home, TRAIN.replace("out, kill_at = sys.argv[1], int(sys.argv[2])",
                                           f"out, kill_at = {str(ref_out)!r}, -1"))
    killed = run_script(home, TRAIN, check=False, args=[os.fspath(out), str(kill_at)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_id = killed.stdout.split("RUN ")[1].split()[0]
    ref_stdout, ref_stderr = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_stderr[-3000:]
    ref_id = ref_stdout.split("RUN ")[1].split()[0]

    env = env_for(home, CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT="2")
    resumed = run_script(home, TRAIN, env=env, args=[os.fspath(out), "-1"])
    restored = resumed.stdout.split("RESTORED ")[1].split()[0]
    # epoch-end saves come after the epoch's last batch: one at kill_at is not made.
    # Adopted as the last step whose metrics the checkpoint covers (global_step - 1)
    checkpoint_steps = [s - 1 for s in range(STEPS_PER_EPOCH, kill_at, STEPS_PER_EPOCH)]
    assert restored == (str(checkpoint_steps[-1]) if checkpoint_steps else "None"), (
        resumed.stdout, resumed.stderr[-3000:])

    a = torch.load(ref_out / "final.pt", weights_only=True)
    b = torch.load(out / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (seed {seed})"

    # what Lightning reported is what ckptd holds, and the resumed run's
    # effective timeline is the uninterrupted one
    ref_points = timeline(home, ref_id)
    assert sorted(ref_points) == csv_points(ref_out)
    assert {k for _, k, _ in ref_points} >= {"loss_step", "loss_epoch", "epoch"}
    assert len([p for p in ref_points if p[1] == "loss_epoch"]) == EPOCHS
    got = timeline(home, run_id)
    assert got == ref_points, f"seed {seed}"

    # every epoch's checkpoint was adopted; retention kept the newest two
    steps = [s for (s,) in db_rows(home, "SELECT step FROM checkpoints WHERE run_id = ?"
                                   " AND status = 'committed' ORDER BY step", (run_id,))]
    assert steps == [STEPS_PER_EPOCH * (EPOCHS - 1) - 1, STEPS_PER_EPOCH * EPOCHS - 1]
    hp = db_rows(home, "SELECT fields FROM events WHERE run_id = ? AND message = 'hparams'",
                 (ref_id,))
    assert json.loads(hp[0][0]) == {"lr": 0.05, "hidden": 16}
