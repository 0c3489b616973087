"""``ckptd demo``: a newcomer's first five minutes, end to end with the real parts.

Trains a small MLP on a synthetic regression task it makes itself (CPU, a few
seconds), through the real client and a real daemon, then shows where to look.
Then the point of it all: the same training in a process of its own, killed
with SIGKILL part-way and brought back with ``ckptd resume``, ends with
weights bit-identical to a run that was never interrupted.

``python -m ckptd.demo --home H --name N --steps S --out FILE`` is that
process (what ``ckptd resume`` relaunches).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def train(run: Any, steps: int, seed: int = 0, ckpt_every: int = 100,
          restore: bool = False, sleep: float = 0.0, lr: float = 3e-3) -> dict[str, Any]:
    """The demo's training loop; returns the final metrics.

    ``restore``: continue from the run's newest checkpoint, if it has one
    (batches and dropout draw from torch's global generator, which the
    checkpoint carries, so the continuation is exact).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 16, generator=g)
    true_w = torch.randn(16, 1, generator=g)
    y = x @ true_w + 0.1 * torch.randn(2048, 1, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    start, handle = 0, None
    if restore and (state := run.restore()) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"]) + 1
    for step in range(start, steps):
        idx = torch.randint(0, 2048, (64,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log({"loss": loss, "lr": opt.param_groups[0]["lr"]}, step=step)
        if step % 100 == 0:
            run.event(f"step {step}: loss {loss.item():.4f}")
        if step % ckpt_every == ckpt_every - 1 or step == steps - 1:
            # blocks only for the in-memory snapshot; the daemon writes it
            handle = run.checkpoint({"model": model.state_dict(), "opt": opt.state_dict(),
                                     "step": step}, step=step, metrics={"loss": loss})
        if sleep:
            time.sleep(sleep)
    if handle is not None:
        handle.wait(timeout=60)  # durable before we report it
    return {"loss": loss.item(), "model": model}


def run_demo(home: Path, steps: int = 300, out: Callable[[str], None] = print) -> str:
    import ckptd_client as ckptd
    import torch

    from ckptd.retention import LatestN

    out(f"ckptd demo: training a small MLP for {steps} steps (home {home})")
    with ckptd.init(project="demo", name="demo", config={"steps": steps}, seed=0,
                    home=home, retention=LatestN(2)) as run:
        final = train(run, steps)
        run.flush()
        state = run.restore()  # what a resumed run does first
        if state is not None:
            same = all(torch.equal(a, b) for a, b in zip(
                final["model"].state_dict().values(), state["model"].values(), strict=True))
            out(f"restored checkpoint step {state['step']}: weights "
                f"{'identical' if same else 'DIFFERENT'} to the trained model")
    out(f"run {run.id} finished: final loss {final['loss']:.4f}")
    out("look at it with:")
    where = f"--home {shlex.quote(os.fspath(home))}"
    out(f"  ckptd ls {where}")
    out(f"  ckptd tail {run.id} --metrics -n 5 {where}")
    out(f"  ckptd metrics {run.id} --key loss --format csv {where}")
    out(f"  ckptd ckpt ls {run.id} {where}")
    crash_and_resume(home, max(steps, 60), out)
    return run.id


def weights_hash(model: Any) -> str:
    """sha256 over every parameter's name and raw bytes.

    The bytes are copied into a bytearray through ``torch.frombuffer``, not
    ``.numpy()``: torch wheels do not depend on numpy, and a fresh
    ``pip install torch`` venv has none (the demo died there).
    """
    import torch

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        flat = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8)
        raw = bytearray(flat.numel())
        if raw:
            torch.frombuffer(raw, dtype=torch.uint8).copy_(flat)
        h.update(raw)
    return h.hexdigest()


def crash_and_resume(home: Path, steps: int, out: Callable[[str], None] = print) -> bool:
    """Train uninterrupted; train again, SIGKILL it half-way, ``ckptd resume``
    it; say whether the final weights are bit-identical."""
    from ckptd.store import query
    from ckptd.supervise.resume import resume

    out("")
    out(f"crash test: {steps} steps in a process of its own, killed with SIGKILL half-way, "
        "then `ckptd resume`d")
    tmp = home / "demo"
    tmp.mkdir(exist_ok=True)
    ref_out, cut_out = tmp / "uninterrupted.hash", tmp / "resumed.hash"
    every = max(steps // 6, 2)

    def cmd(name: str, target: Path, sleep: float) -> list[str]:
        return [sys.executable, "-m", "ckptd.demo", "--home", os.fspath(home), "--name", name,
                "--steps", str(steps), "--ckpt-every", str(every), "--sleep", str(sleep),
                "--out", os.fspath(target)]

    env = {k: v for k, v in os.environ.items() if k not in ("CKPTD_RUN_ID", "CKPTD_ATTEMPT")}
    subprocess.run(cmd("demo-uninterrupted", ref_out, 0), env=env, check=True,
                   stdin=subprocess.DEVNULL)
    proc = subprocess.Popen(cmd("demo-crash", cut_out, 0.02), env=env, stdin=subprocess.DEVNULL)
    run = _wait_run(home, "demo-crash", lambda r: (r["step"] or 0) >= steps // 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = _wait_run(home, "demo-crash", lambda r: r["status"] != "running")
    out(f"killed run {run['id']} at step {run['step']}: the daemon marked it {run['status']}")
    code = resume(home, run["id"], out=out)
    with query.Reader(home) as reader:
        info = reader.show(run["id"])
    same = code == 0 and cut_out.exists() and cut_out.read_text() == ref_out.read_text()
    out(f"resumed as attempt {info['attempt']} ({info['status']}); final weights sha256:")
    out(f"  never interrupted   {ref_out.read_text()}")
    out(f"  killed and resumed  {cut_out.read_text() if cut_out.exists() else '-'}")
    out("  bit-identical" if same else "  DIFFERENT")
    out(f"  ckptd show {run['id']} --home {shlex.quote(os.fspath(home))}"
        "    # attempts, where it resumed")
    return same


def _wait_run(home: Path, name: str, pred: Callable[[dict[str, Any]], bool],
              timeout: float = 60) -> dict[str, Any]:
    from ckptd_client.errors import NotFound

    from ckptd.store import query

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with query.Reader(home) as reader:
                run = reader.resolve(name)
            if pred(run):
                return run
        except NotFound:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"demo: run {name} did not get there within {timeout:.0f} s")


def _main(argv: list[str] | None = None) -> int:
    """The training process of the crash test (what ``ckptd resume`` relaunches)."""
    import ckptd_client as ckptd

    parser = argparse.ArgumentParser(prog="python -m ckptd.demo")
    parser.add_argument("--home", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--ckpt-every", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    run = ckptd.init(project="demo", name=args.name, seed=0, home=args.home,
                     config={"steps": args.steps})
    final = train(run, args.steps, ckpt_every=args.ckpt_every, restore=True, sleep=args.sleep)
    Path(args.out).write_text(weights_hash(final["model"]))
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
