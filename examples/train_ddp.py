"""A resumable DDP training script: every rank joins one ckptd run.

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py --steps 60

gloo on CPU, nccl when CUDA is present. Checkpoints are collective and in
the torch.distributed.checkpoint format; a restarted job (``torchrun
--max-restarts``, ``ckptd run --auto-resume``, ``ckptd resume``) continues
from the newest verified one, every rank's RNG included, so for the same
world size (any number of ranks: see ``settle_ddp_buckets``) the final weights
are bit-identical to an uninterrupted run.
On SIGTERM/SIGUSR1 (a scheduler's preemption notice) it checkpoints and exits;
the attempt is recorded as ``preempted``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import ckptd_client as ckptd
import torch
import torch.distributed as dist
from ckptd_client.distributed import elastic_store, settle_ddp_buckets
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step (for demos)")
    p.add_argument("--out", help="rank 0 saves the final weights here (torch.save)")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    store = elastic_store()  # None outside torchrun; see its docstring
    if store is not None:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    else:
        dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    run = ckptd.init(name="train-ddp", config=vars(args), seed=0)

    model = DDP(torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 1)).to(device),
                device_ids=[device.index] if cuda else None)
    # DDP rebuilds its gradient buckets after its first backward, and with 3+ ranks
    # the bucket layout changes the allreduce's last bits: settle them before step 0
    # in every run, so a resumed run steps exactly as an uninterrupted one
    settle_ddp_buckets(model, torch.zeros(1, 16, device=device))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    # get_state_dict/set_state_dict: the same code works for DDP and FSDP2 models
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": -1}
    start = 0
    if run.restore(into=state) is not None:  # every rank loads its part, in place
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        start = state["step"] + 1
        if rank == 0:
            print(f"resumed after step {state['step']}", flush=True)

    handle = None
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(step * 1000 + rank)  # this rank's batch
        x = torch.randn(32, 16, generator=g)
        y = x.sin().sum(1, keepdim=True) + 0.01 * torch.randn(32, 1)  # global RNG: restored
        loss = torch.nn.functional.mse_loss(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log({"loss": loss.item()}, step=step)
        # a preemption notice reaches one rank or all: every rank must agree to stop
        stop = torch.tensor([int(run.should_stop)], device=device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if (step + 1) % args.ckpt_every == 0 or stop.item():
            msd, osd = get_state_dict(model, opt)
            # blocks only for the snapshot; written and committed in the background
            handle = run.checkpoint({"model": msd, "optim": osd, "step": step}, step=step)
        if stop.item():
            handle.wait()  # durable before exiting (finish() would wait too)
            if rank == 0:
                print(f"preempted: checkpointed step {step}, exiting", flush=True)
            break
        if args.sleep:
            time.sleep(args.sleep)

    if rank == 0 and args.out:
        torch.save(model.module.state_dict(), args.out)
    if handle is not None:
        # the newest checkpoint durable before this rank says it is done: a job whose
        # last step could not be committed (a peer died inside it) must not exit 0
        try:
            handle.wait()
        except ckptd.CheckpointError as exc:
            print(f"rank {rank}: the last checkpoint failed: {exc}", file=sys.stderr, flush=True)
            run.finish(status="failed", exit_code=1, reason=str(exc))
            sys.exit(1)
    run.finish()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
