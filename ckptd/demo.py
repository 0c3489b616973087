"""``ckptd demo``: a newcomer's first five minutes, end to end with the real parts.

Trains a small MLP on a synthetic regression task it makes itself (CPU, a few
seconds), through the real client and a real daemon, then shows where to look.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def train(run: Any, steps: int, seed: int = 0) -> dict[str, Any]:
    """The demo's training loop; returns the final metrics."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 16, generator=g)
    true_w = torch.randn(16, 1, generator=g)
    y = x @ true_w + 0.1 * torch.randn(2048, 1, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = torch.tensor(0.0)
    for step in range(steps):
        idx = torch.randint(0, 2048, (64,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log({"loss": loss, "lr": opt.param_groups[0]["lr"]}, step=step)
        if step % 100 == 0:
            run.event(f"step {step}: loss {loss.item():.4f}")
        if step % 100 == 99 or step == steps - 1:
            # blocks only for the in-memory snapshot; the daemon writes it
            handle = run.checkpoint({"model": model.state_dict(), "opt": opt.state_dict(),
                                     "step": step}, step=step, metrics={"loss": loss})
    if steps:
        handle.wait(timeout=60)  # durable before we report it
    return {"loss": loss.item(), "model": model}


def run_demo(home: Path, steps: int = 300, out: Callable[[str], None] = print) -> str:
    import ckptd_client as ckptd
    import torch

    from .retention import LatestN

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
    out(f"  ckptd ls --home {home}")
    out(f"  ckptd tail {run.id} --metrics -n 5 --home {home}")
    out(f"  ckptd metrics {run.id} --key loss --format csv --home {home}")
    out(f"  ckptd ckpt ls {run.id} --home {home}")
    return run.id
