"""Checkpoints end to end: real trainer processes, a real daemon, real kill -9.

SPEC promises 2 (whole and verified, or invisible), 3 (only the snapshot
blocks; committed even if the trainer dies right after) and 4 (no daemon or
a full disk is an error the loop handles), and section 4's restore().
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import (
    RESTORE_SCRIPT,
    DaemonProc,
    ckptd,
    db_rows,
    env_for,
    run_script,
    two_checkpoints_newest_flipped,
    wait_for,
)

TRAIN = """
import os, random, sys, warnings
import numpy as np
import torch
import ckptd_client as ckptd

def make():
    torch.manual_seed(123)  # a different stream than the run's: restore must fix it
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched

def train(model, opt, sched, n):
    out = []
    for _ in range(n):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        out.append([loss.item(), random.random(), float(np.random.rand())])
    return out

def state(model, opt, sched, step):
    return {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "step": step, "extra": {"tuple": (1, 2.5, None, "x"), 7: [True]}}
"""


def ckpt_rows(home: Path) -> list[tuple[int, str]]:
    return db_rows(home, "SELECT step, status FROM checkpoints ORDER BY step")


def ckpt_dirs(home: Path, run_id: str) -> list[str]:
    root = home / "runs" / run_id / "checkpoints"
    return sorted(os.listdir(root)) if root.exists() else []


def test_round_trip_is_bit_exact_and_rng_streams_continue(home: Path, daemon: DaemonProc,
                                                          tmp_path: Path) -> None:
    expected = tmp_path / "expected.pt"
    out = run_script(home, TRAIN + f"""
run = ckptd.init(name="rt", seed=1)
model, opt, sched = make()
train(model, opt, sched, 5)
h = run.checkpoint(state(model, opt, sched, 5), step=5, metrics={{"loss": 0.25}})
info = h.wait(30)
assert h.done() and h.exception() is None and info["hash"].startswith("sha256:")
after = train(model, opt, sched, 6)
torch.save({{"after": after, "params": [p.detach().clone() for p in model.parameters()]}},
           {str(expected)!r})
print(run.id)
run.finish()
""").stdout.split()[-1]
    result = run_script(home, TRAIN + f"""
run = ckptd.init()
model, opt, sched = make()
st = run.restore()
assert run.restored_step == 5, run.restored_step
assert st["step"] == 5 and st["extra"] == {{"tuple": (1, 2.5, None, "x"), 7: [True]}}, st
assert sorted(st["opt"]["state"]) == [0, 1, 2, 3]  # int keys survive
model.load_state_dict(st["model"])
opt.load_state_dict(st["opt"])
sched.load_state_dict(st["sched"])
after = train(model, opt, sched, 6)
exp = torch.load({str(expected)!r}, weights_only=True)
assert after == exp["after"], (after, exp["after"])
for a, b in zip(model.parameters(), exp["params"]):
    assert torch.equal(a.detach(), b)
print("identical")
run.finish()
""", env=env_for(home, CKPTD_RUN_ID=out, CKPTD_ATTEMPT="2"))
    assert "identical" in result.stdout
    # the export is one plain torch.save file that loads without ckptd
    target = tmp_path / "export.pt"
    ckptd(home, "ckpt", "export", out, "-o", str(target), check=True)
    check = subprocess.run(["python", "-c", f"""
import torch
d = torch.load({str(target)!r}, weights_only=True)
assert d["step"] == 5 and d["metrics"] == {{"loss": 0.25}}
assert set(d["state"]) == {{"model", "opt", "sched", "step", "extra"}}
assert isinstance(d["rng"]["torch"], torch.Tensor)
print("loaded")
"""], capture_output=True, text=True, timeout=60)
    assert "loaded" in check.stdout, check.stderr
    ls = json.loads(ckptd(home, "ckpt", "ls", out, "--json", check=True).stdout)
    assert [(c["step"], c["status"], c["metrics"]) for c in ls] == [(5, "committed",
                                                                      {"loss": 0.25})]
    assert set(ls[0]) >= {"step", "status", "bytes", "hash", "metrics", "blocked_s",
                          "persist_s"}
    assert ls[0]["blocked_s"] > 0 and ls[0]["persist_s"] > 0 and ls[0]["bytes"] > 0


def test_trainer_killed_right_after_checkpoint_returns_is_committed(home: Path,
                                                                    daemon: DaemonProc) -> None:
    proc = run_script(home, """
import os, signal, torch
import ckptd_client as ckptd
run = ckptd.init(name="k9")
print(run.id, flush=True)
state = {"w": torch.randn(4096, 1024), "b": torch.arange(1000)}  # 16 MiB
run.checkpoint(state, step=7)
os.kill(os.getpid(), signal.SIGKILL)  # the instant checkpoint() returns
""", check=False)
    assert proc.returncode == -9, proc.stderr
    run_id = proc.stdout.split()[0]
    wait_for(lambda: ckpt_rows(home) == [(7, "committed")], what="checkpoint row")
    assert ckpt_dirs(home, run_id) == ["step-7"]
    verify = ckptd(home, "ckpt", "verify", run_id)
    assert verify.returncode == 0, verify.stderr
    # the dead trainer's snapshot buffer does not leak: the daemon let go of its memfd
    def memfds() -> list[str]:
        fd_dir = Path(f"/proc/{daemon.pid}/fd")
        out = []
        for name in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                out.append(os.readlink(fd_dir / name))
        return [t for t in out if t.startswith("/memfd:ckptd")]

    wait_for(lambda: not memfds(), what="snapshot buffer released")


CRASH_SCRIPT = """
import torch, ckptd_client as ckptd
from ckptd_client import DaemonUnavailable
run = ckptd.init(name="crash")
print(run.id, flush=True)
run.checkpoint({"w": torch.full((256, 256), 1.0), "step": 1}, step=1).wait(30)
h = run.checkpoint({"w": torch.full((256, 256), 2.0), "step": 2}, step=2)
try:
    h.wait(30)
    print("committed")
except DaemonUnavailable as exc:
    print("lost:", exc)
run.log({"after": 1.0})  # logging keeps working with the daemon gone
"""

@pytest.mark.parametrize("point,survives", [
    ("ckpt.staged", False),
    ("ckpt.after_rename", True),
    pytest.param("ckpt.before_rename", False, marks=pytest.mark.slow),
    pytest.param("ckpt.before_row", True, marks=pytest.mark.slow),
    pytest.param("ckpt.after_row", True, marks=pytest.mark.slow),
])
def test_daemon_killed_during_commit_leaves_no_torn_checkpoint(home: Path, point: str,
                                                               survives: bool) -> None:
    """kill -9 of the daemon at each step of the commit: after a restart only
    whole checkpoints are visible and restore picks the newest of those."""
    env = env_for(home, CKPTD_NO_AUTOSTART="1")
    dying = DaemonProc(home, env=env_for(home, CKPTD_CRASH_AT=f"{point}:2"))
    dying.start()
    try:
        out = run_script(home, CRASH_SCRIPT, env=env).stdout
        dying.proc.wait(timeout=30)  # type: ignore[union-attr]
        assert dying.proc.returncode == -9  # type: ignore[union-attr]
    finally:
        dying.stop()
    run_id = out.split()[0]
    assert "lost:" in out, out
    daemon = DaemonProc(home)
    daemon.start()
    try:
        want = [(1, "committed"), (2, "committed")] if survives else [(1, "committed")]
        wait_for(lambda: ckpt_rows(home) == want, what=f"rows {want}")
        # no staging left, and reconcile removes the commit record it adopted
        # step-2 by (just after the row, under the run's lock)
        wait_for(lambda: ckpt_dirs(home, run_id) == [f"step-{s}" for s, _ in want],
                 timeout=10, what="only whole step directories")
        restored = run_script(home, RESTORE_SCRIPT,
                              env=env_for(home, CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT="2")).stdout
        step = 2 if survives else 1
        # the whole tensor, every element, holds its step (not only w[0, 0])
        assert f"restored {step} whole" in restored, restored
    finally:
        daemon.stop()


def test_flipped_byte_makes_restore_fall_back_and_verify_fail(home: Path,
                                                              daemon: DaemonProc) -> None:
    run_id = two_checkpoints_newest_flipped(home, "flip", 1234)
    proc = run_script(home, """
import warnings, torch, ckptd_client as ckptd
run = ckptd.init()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    st = run.restore()
print("restored", st["step"], float(st["w"][0]))
print("warned", [str(w.message) for w in caught])
run.finish()
""", env=env_for(home, CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT="2"))
    assert "restored 10 10.0" in proc.stdout
    assert "skipped checkpoint step 20" in proc.stdout and "fails its xxh3_128" in proc.stdout
    events = db_rows(home, "SELECT message FROM events WHERE run_id = ? AND level = 'warning'",
                     (run_id,))
    assert any("skipped checkpoint step 20" in m for (m,) in events)
    verify = ckptd(home, "ckpt", "verify", run_id)
    assert verify.returncode != 0
    assert "step 20" in verify.stderr and "corrupt" in verify.stderr
    assert "fails its blake3" in verify.stdout
    assert ckpt_rows(home) == [(10, "committed"), (20, "corrupt")]


def test_retention_keeps_exactly_what_the_policy_says(home: Path, daemon: DaemonProc) -> None:
    run_id = run_script(home, """
import torch, ckptd_client as ckptd
from ckptd.retention import BestN, EveryN, LatestN
run = ckptd.init(name="ret", retention=LatestN(2) | EveryN(4) | BestN("loss", 1))
losses = {1: 5.0, 2: 0.1, 3: 4.0, 4: 3.0, 5: 2.0, 6: 1.0, 7: 0.5, 8: 0.4, 9: 0.3}
for step in range(1, 10):
    run.checkpoint({"w": torch.ones(10) * step}, step=step,
                   metrics={"loss": losses[step]}).wait(30)
print(run.id)
run.finish()
""").stdout.split()[-1]
    # latest 2 -> 8, 9; every 4 -> 4, 8; best loss -> 2
    want = [2, 4, 8, 9]
    wait_for(lambda: [s for s, _ in ckpt_rows(home)] == want, what=f"steps {want}")
    assert ckpt_dirs(home, run_id) == [f"step-{s}" for s in want]
    show = json.loads(ckptd(home, "show", run_id, "--json", check=True).stdout)
    assert show["retention"] == {"any": [{"latest": 2}, {"every": 4},
                                         {"best": {"metric": "loss", "n": 1, "mode": "min"}}]}


@pytest.fixture
def small_home(home: Path) -> Path:
    """``home`` on a 20 MiB tmpfs (root only); unmounted after the daemon is stopped."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m,mode=0700", "tmpfs",
                           str(home)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield home
    finally:
        from helpers import kill_home_daemon

        kill_home_daemon(home)
        subprocess.run(["umount", "-l", str(home)], capture_output=True)


FULL_SCRIPT = """
import torch, ckptd_client as ckptd
from ckptd_client import DiskFull
run = ckptd.init(name="full")
print(run.id)
run.checkpoint({"w": torch.ones(256 * 1024)}, step=1).wait(30)  # 1 MiB: fits
h = run.checkpoint({"w": torch.ones(8 * 1024 * 1024)}, step=2)  # 32 MiB: does not
try:
    h.wait(30)
    print("no error?")
except DiskFull as exc:
    print("diskfull:", exc)
for i in range(100):
    run.log({"loss": float(i)}, step=100 + i)
run.flush()
run.checkpoint({"w": torch.ones(1024)}, step=3).wait(30)  # still works afterwards
run.finish()
"""


@pytest.mark.parametrize("precheck", [True, False], ids=["space-check", "enospc-mid-write"])
def test_full_disk_fails_the_checkpoint_and_damages_nothing(small_home: Path,
                                                            precheck: bool) -> None:
    home = small_home
    env = env_for(home) if precheck else env_for(home, CKPTD_TEST_SKIP_SPACE_CHECK="1")
    daemon = DaemonProc(home, env=env)
    daemon.start()
    try:
        out = run_script(home, FULL_SCRIPT).stdout
        run_id = out.split()[0]
        assert "diskfull:" in out and "step 2" in out, out
        assert ("free" in out) if precheck else ("disk full" in out)
        assert ckpt_rows(home) == [(1, "committed"), (3, "committed")]
        assert ckpt_dirs(home, run_id) == ["step-1", "step-3"]  # staging removed
        assert ckptd(home, "ckpt", "verify", run_id).returncode == 0
        assert db_rows(home, "SELECT COUNT(*) FROM metrics WHERE key = 'loss'") == [(100,)]
        assert db_rows(home, "PRAGMA integrity_check") == [("ok",)]
        events = db_rows(home, "SELECT message FROM events WHERE level = 'error'")
        assert any("checkpoint step 2 failed" in m for (m,) in events), events
    finally:
        daemon.stop()


def test_malformed_state_raises_type_error_naming_its_path(home: Path,
                                                           daemon: DaemonProc) -> None:
    import ckptd_client as ckptd
    import torch

    run = ckptd.init(name="bad", home=home)
    try:
        with pytest.raises(TypeError, match=r"state\['opt'\]\['foo'\] is a .*object"):
            run.checkpoint({"model": {"w": torch.ones(2)}, "opt": {"foo": object()}}, step=1)
        with pytest.raises(TypeError, match=r"state\['x'\]\[1\] is a .*set"):
            run.checkpoint({"x": [1, {2}]}, step=1)
        with pytest.raises(TypeError, match=r"step must be a non-negative int"):
            run.checkpoint({}, step="3")  # type: ignore[arg-type]
        assert run.checkpoint({"ok": torch.zeros(3)}, step=1).wait(30)["step"] == 1
    finally:
        run.finish()


def test_no_daemon_fails_through_the_handle_and_logging_continues(home: Path) -> None:
    import ckptd_client as ckptd
    import torch
    from ckptd_client import DaemonUnavailable

    run = ckptd.init(name="nodaemon", home=home, autostart=False)
    try:
        h = run.checkpoint({"w": torch.ones(4)}, step=1)
        assert h.done()
        assert isinstance(h.exception(), DaemonUnavailable)
        with pytest.raises(DaemonUnavailable, match="daemon"):
            h.wait(1)
        run.log({"loss": 1.0}, step=1)  # goes to the spool
        assert run.restore() is None
    finally:
        run.finish(timeout=2)
    assert any((home / "spool").iterdir())


def _no_cuda_reason() -> str:
    """Why the CUDA test cannot run: the only condition that may skip it."""
    import torch

    if torch.cuda.is_available():
        return ""
    if torch.version.cuda is None and any(Path("/dev").glob("nvidia[0-9]*")):
        return (f"an NVIDIA GPU is present but torch {torch.__version__} is a CPU-only "
                "build: install a CUDA build of torch to run the CUDA RNG round trip")
    return (f"no CUDA GPU visible to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'none, CPU-only wheel'})")


@pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason() or "-")
def test_cuda_tensors_and_cuda_rng_round_trip(home: Path, daemon: DaemonProc) -> None:
    """The only test of CUDA tensors and CUDA RNG restore: it runs on every
    machine with a GPU (never marked slow, no other condition)."""
    out = run_script(home, """
import torch, ckptd_client as ckptd
run = ckptd.init(name="cuda", seed=3)
w = torch.randn(1024, 1024, device="cuda")
torch.rand(1, device="cuda")
h = run.checkpoint({"w": w, "cpu": torch.ones(3)}, step=1)
h.wait(60)
expect = torch.rand(4, device="cuda")
st = run.restore(map_location="cuda")
assert st["w"].is_cuda and torch.equal(st["w"], w)
assert torch.equal(torch.rand(4, device="cuda"), expect)  # the CUDA stream continues
print("cuda ok")
run.finish()
""").stdout
    assert "cuda ok" in out


def test_state_without_tensors_needs_no_torch(home: Path, daemon: DaemonProc) -> None:
    out = run_script(home, """
import random, sys
import ckptd_client as ckptd
run = ckptd.init(name="plain")
random.seed(5)
run.checkpoint({"epoch": 3, "names": ["a", "b"], "lr": 0.1}, step=3).wait(30)
expect = random.random()
st = run.restore()
assert st == {"epoch": 3, "names": ["a", "b"], "lr": 0.1}, st
assert random.random() == expect  # python's RNG restored too
assert "torch" not in sys.modules
print("plain ok")
run.finish()
""").stdout
    assert "plain ok" in out
