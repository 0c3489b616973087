"""A training script that survives kill -9: run it, kill it, `ckptd resume` it.

Everything a bit-identical continuation needs is in its checkpoints: model,
Adam's moments, the LR schedule, the sampler's epoch/position/generator
(:func:`ckptd_client.data.resumable_loader`) and, added by ckptd itself,
every RNG state (dropout draws from torch's global generator).

    ckptd run --name demo -- python examples/train_resumable.py --steps 200
    # kill it any way you like, then:
    ckptd resume demo

Convention: ``run.checkpoint(state, step=S)`` is taken after step ``S`` was
trained and logged; a resumed attempt continues at ``S + 1``.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import ckptd_client as ckptd
import torch
from ckptd_client.data import resumable_loader
from torch.utils.data import TensorDataset


def params_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and raw bytes."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ckpt-every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step (pacing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64, help="width of the hidden layers")
    parser.add_argument("--depth", type=int, default=1, help="hidden layers (state size)")
    parser.add_argument("--name", default="train-resumable")
    parser.add_argument("--out", default=None, help="write the final parameter hash here")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the same reduction order every time
    torch.use_deterministic_algorithms(True)
    run = ckptd.init(project="examples", name=args.name, config=vars(args), seed=args.seed)

    data_gen = torch.Generator().manual_seed(1234)  # the dataset itself never changes
    x = torch.randn(400, 32, generator=data_gen)
    y = torch.sin(x @ torch.randn(32, 1, generator=data_gen))
    dataset = TensorDataset(x, y)
    loader, sampler = resumable_loader(dataset, batch_size=args.batch_size, seed=args.seed)

    layers = [torch.nn.Linear(32, args.hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2)]
    for _ in range(args.depth - 1):
        layers += [torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(args.hidden, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=1e-4)

    step = 0
    state = run.restore()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        sampler.load_state_dict(state["sampler"])
        step = int(state["step"]) + 1
    print(f"attempt {run.attempt}: training from step {step}", flush=True)

    model.train()
    while step < args.steps:
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            run.log({"loss": loss.item(), "lr": sched.get_last_lr()[0]}, step=step)
            if step % args.ckpt_every == 0 or step == args.steps - 1:
                run.checkpoint({"model": model.state_dict(), "optim": opt.state_dict(),
                                "sched": sched.state_dict(), "sampler": sampler.state_dict(),
                                "step": step}, step=step)
            step += 1
            if args.sleep:
                time.sleep(args.sleep)
            if step >= args.steps:
                break

    digest = params_hash(model)
    run.event(f"final parameter hash {digest}", params_hash=digest)
    if args.out:
        Path(args.out).write_text(digest)
    print(f"final-hash {digest}", flush=True)
    run.finish()


if __name__ == "__main__":
    main()
