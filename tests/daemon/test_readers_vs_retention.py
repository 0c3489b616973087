"""``ckpt export`` and ``ckpt verify`` while retention prunes: a checkpoint
deleted on purpose is skipped or reported gone, never called corrupt, and the
reader always gets a checkpoint that verifies."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from helpers import DaemonProc, ckptd, db_rows, spawn_script, wait_for

CHURN = """
import time, torch, ckptd_client as ckptd
run = ckptd.init(name="churn", retention={"latest": 2})
w = torch.zeros(64, 1024)
step = 0
while True:
    step += 1
    w.fill_(float(step))
    run.checkpoint({"w": w}, step=step).wait(timeout=60)
    time.sleep(0.05)
"""


def churn_started(home: Path) -> None:
    wait_for(lambda: db_rows(home, "SELECT COUNT(*) FROM checkpoints")[0][0] >= 2,
             timeout=120, what="checkpoints")


def no_errors(home: Path) -> None:
    (top,), = db_rows(home, "SELECT MAX(step) FROM checkpoints")
    assert top > 10, top  # retention really ran all along
    rows = json.loads(ckptd(home, "ckpt", "ls", "churn", "--json", check=True).stdout)
    assert all(r["status"] == "committed" for r in rows), rows
    errors = db_rows(home, "SELECT message FROM events WHERE level = 'error'")
    assert errors == [], errors


def test_export_racing_retention_exports_a_checkpoint_that_verifies(
        home: Path, daemon: DaemonProc) -> None:
    trainer = spawn_script(home, CHURN)
    try:
        churn_started(home)
        out = home.parent / "export.pt"
        for i in range(3):  # each spends seconds importing torch while steps are pruned
            res = ckptd(home, "ckpt", "export", "churn", "-o", str(out), timeout=120)
            assert res.returncode == 0, (i, res.stderr)
            saved = torch.load(out, weights_only=True)
            assert bool((saved["state"]["w"] == float(saved["step"])).all())
        no_errors(home)
    finally:
        trainer.kill()
        trainer.wait(timeout=10)


def test_verify_racing_retention_never_calls_a_pruned_checkpoint_corrupt(
        home: Path, daemon: DaemonProc) -> None:
    from ckptd_client import transport

    trainer = spawn_script(home, CHURN.replace("time.sleep(0.05)", "pass"))
    try:
        churn_started(home)
        (run_id,), = db_rows(home, "SELECT id FROM runs")
        statuses: dict[str, int] = {}
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            for r in transport.call(home, "ckpt_verify", {"run": run_id}, autostart=False):
                statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        print("verify statuses while pruning:", statuses)
        assert "corrupt" not in statuses, statuses
        res = ckptd(home, "ckpt", "verify", "churn", timeout=120)
        assert res.returncode == 0 and "CORRUPT" not in res.stdout, (res.stdout, res.stderr)
        no_errors(home)
    finally:
        trainer.kill()
        trainer.wait(timeout=10)
