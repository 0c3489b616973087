"""A resumable FSDP2 training script (``fully_shard``): every rank joins one ckptd run.

    torchrun --standalone --nproc-per-node 2 examples/train_fsdp.py --steps 60

The FSDP2 twin of train_ddp.py: parameters and optimizer state are sharded
(DTensors), and the checkpoint holds each rank's shards. gloo on CPU, nccl
when CUDA is present. Checkpoints are collective and in
the torch.distributed.checkpoint format; a restarted job (``torchrun
--max-restarts``, ``ckptd run --auto-resume``, ``ckptd resume``) continues
from the newest verified one, every rank's RNG included, so for the same
world size the final weights are bit-identical to an uninterrupted run.
On SIGTERM/SIGUSR1 (a scheduler's preemption notice) it checkpoints and exits;
the attempt is recorded as ``preempted``.
"""

from __future__ import annotations

import argparse
import os
import time

import ckptd_client as ckptd
import torch
import torch.distributed as dist
from ckptd_client.distributed import elastic_store
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard


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
    run = ckptd.init(name="train-fsdp", config=vars(args), seed=0)

    torch.manual_seed(0)  # the same initial weights on every rank before sharding
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 1)).to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    # get_state_dict/set_state_dict: sharded (DTensor) state, resharded by DCP on restore
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": -1}
    start = 0
    if run.restore(into=state) is not None:  # every rank loads its part, in place
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        start = state["step"] + 1
        if rank == 0:
            print(f"resumed after step {state['step']}", flush=True)

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
            run.checkpoint({"model": msd, "optim": osd, "step": step}, step=step).wait()
        if stop.item():
            if rank == 0:
                print(f"preempted: checkpointed step {step}, exiting", flush=True)
            break
        if args.sleep:
            time.sleep(args.sleep)

    if args.out:  # gathering the full weights is collective: every rank takes part
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
        if rank == 0:
            torch.save(full, args.out)
    run.finish()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
