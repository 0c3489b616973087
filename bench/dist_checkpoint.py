"""Blocked and durable time of a collective checkpoint, ckptd vs DCP, side by side.

    torchrun --standalone --nproc-per-node 2 bench/dist_checkpoint.py --mib 512

``--mib`` is the total state over all ranks. Rows (rank 0's wall times, median
of ``--repeat``): ckptd ``run.checkpoint`` (blocked = returned, durable =
committed row); DCP ``async_save`` (blocked = returned; durable = future done,
no fsync); DCP ``save`` with ``sync_files=True`` (its own per-file fsync).
ckptd's DCP path is synchronous today, so its blocked time equals its durable
time: the target (blocked <= 1.2x async_save's) is not met yet.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import ckptd_client as ckptd
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = args.mib * (1 << 20) // 4 // world
    state = {f"w{rank}": torch.randn(n)}  # each rank's own shard
    run = ckptd.init(name="bench-dist-checkpoint")
    tmp = tempfile.mkdtemp(prefix="dcp-bench-", dir=os.environ.get("BENCH_DIR"))
    rows: dict[str, list[tuple[float, float]]] = {"ckptd": [], "dcp.async_save": [],
                                                  "dcp.save+fsync": []}
    for i in range(args.repeat):
        dist.barrier()
        t0 = time.perf_counter()
        h = run.checkpoint(state, step=i)
        t1 = time.perf_counter()
        h.wait()
        rows["ckptd"].append((t1 - t0, time.perf_counter() - t0))
        dist.barrier()
        t0 = time.perf_counter()
        fut = dcp.async_save(state, checkpoint_id=f"{tmp}/a{i}")
        t1 = time.perf_counter()
        fut.result()
        rows["dcp.async_save"].append((t1 - t0, time.perf_counter() - t0))
        dist.barrier()
        t0 = time.perf_counter()
        dcp.save(state, storage_writer=dcp.FileSystemWriter(f"{tmp}/s{i}", sync_files=True))
        t = time.perf_counter() - t0
        rows["dcp.save+fsync"].append((t, t))
    dist.barrier()
    if rank == 0:
        print(f"{world} ranks, {args.mib} MiB total, median of {args.repeat}")
        print(f"{'':16} {'blocked s':>10} {'durable s':>10}")
        for name, vals in rows.items():
            print(f"{name:16} {statistics.median(v[0] for v in vals):10.3f} "
                  f"{statistics.median(v[1] for v in vals):10.3f}")
        shutil.rmtree(tmp, ignore_errors=True)
    run.finish()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
