"""Where ``restore()`` is called (issue 9.7): placed right after ``init()``,
before the model is built, model construction draws from the RNG states
ckptd just restored and the resumed run diverged with no word. Now it warns,
naming the fix; the usual placement (after the model, before the loop, the
loop drawing before its first ``log()``) stays bit-identical and silent.

Real ``kill -9`` of attempt 1 after its checkpoint, attempt 2 joining the run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from helpers import DaemonProc, ckptd, db_rows, env_for, run_script, spawn_script

SCRIPT = """
import hashlib, sys, time, torch
import ckptd_client as ckptd
placement, stop_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
run = ckptd.init(name="place-" + placement, seed=0)
state = run.restore() if placement == "early" else None
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
if placement == "late":
    state = run.restore()
start = 0
if state is not None:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    start = state["step"] + 1
for step in range(start, 10):
    x = torch.randn(16, 4)  # the loop draws before its first log(), like dropout
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    run.log({"loss": loss.item()}, step=step)
    if step == 4:
        run.checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "step": step},
                       step=step).wait(timeout=60)
    if step == stop_at:
        print("ready", flush=True)
        time.sleep(120)
weights = repr([p.detach().tolist() for p in model.parameters()]).encode()
open(out, "w").write(hashlib.sha256(weights).hexdigest())
run.finish()
"""


def killed_and_resumed(home: Path, placement: str) -> tuple[str, str]:
    """(final weights hash, attempt 2's stderr) of a run killed at step 6."""
    script = home.parent / "place.py"
    script.write_text(SCRIPT)
    out = home.parent / f"{placement}.hash"
    first = spawn_script(home, f"import runpy, sys\nsys.argv = ['x', {placement!r}, '6', "
                               f"{os.fspath(out)!r}]\nrunpy.run_path({os.fspath(script)!r})")
    assert first.stdout is not None
    assert first.stdout.readline().strip() == "ready"
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    (run_id,), = db_rows(home, "SELECT id FROM runs WHERE name = ?", (f"place-{placement}",))
    proc = run_script(home, SCRIPT, args=[placement, "-1", os.fspath(out)],
                      env=env_for(home, CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT="2"))
    return out.read_text(), proc.stderr


@pytest.fixture
def reference(home: Path, daemon: DaemonProc) -> str:
    out = home.parent / "ref.hash"
    run_script(home, SCRIPT.replace('name="place-" + placement', 'name="ref"'),
               args=["late", "-1", os.fspath(out)])
    return out.read_text()


def test_restore_before_the_model_is_built_warns_naming_the_fix(home, reference) -> None:
    digest, stderr = killed_and_resumed(home, "early")
    if digest == reference:
        return  # bit-identical after all: nothing to warn about
    assert "restore() ran before the model was built" in stderr, stderr
    assert "after the model and optimizer are built" in stderr
    assert stderr.count("restore() ran before") == 1  # once, not per log()
    tail = ckptd(home, "tail", "place-early", check=True).stdout
    assert "restore() ran before the model was built" in tail, tail


def test_usual_placement_stays_bit_identical_and_silent(home, reference) -> None:
    digest, stderr = killed_and_resumed(home, "late")
    assert digest == reference
    assert "restore() ran before" not in stderr, stderr
