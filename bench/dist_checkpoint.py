"""Blocked and durable time of a collective checkpoint, ckptd vs DCP vs dd, side by side.

    python bench/dist_checkpoint.py --mib 1024 --ranks 2 4 --repeat 3

``--mib`` is the total state over all ranks (each rank holds ``mib/world``
of it as its own shard). For each world size it runs ``torchrun --standalone``
of this file (``--worker``); every round runs each case once, in an order
rotated round by round, and rank 0 times:

* ckptd ``run.checkpoint``: blocked = until it returned, durable = until
  ``handle.wait()`` returned (every shard fsynced, hashed, the row committed);
* DCP ``async_save`` (defaults, ``checkpoint_id=``): blocked = until it
  returned, durable = until its future is done;
* the same with a ``DefaultStager`` reused across calls (``async_stager=``,
  CPU copies kept, as ckptd's snapshot does), DCP's fastest staging;
* DCP ``save`` with the fsyncs added: ``FileSystemWriter(sync_files=True)``
  (an fsync per shard and of ``.metadata``) plus an fsync of the directory,
  which DCP does not do; blocked = durable;
* ``dd if=/dev/zero bs=1M conv=fsync`` of the same total bytes, one stream
  (rank 0; the others wait).

Medians of ``--repeat`` rounds; the load average is printed before and after
(the numbers mean little on a loaded machine). Targets (issue 10): ckptd
blocked <= 1.2x async_save's blocked; ckptd durable <= 1.3x dd. The ckptd
home and the files go to a fresh directory under ``--dir`` (default /var/tmp),
removed at the end, and the daemon the bench started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TAG = "BENCH-RESULT "


def worker(args: argparse.Namespace) -> None:
    import ckptd_client as ckptd
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = args.mib * (1 << 20) // 4 // world
    torch.manual_seed(rank)
    state = {f"w{rank}": torch.randn(n)}  # each rank's own shard
    run = ckptd.init(name="bench-dist-checkpoint")
    tmp = Path(args.files)
    stager = DefaultStager(StagingOptions(False, False, False, False))  # reused, like ckptd's
    rows: dict[str, list[tuple[float, float]]] = {}
    phases: dict[str, list[float]] = {}

    def ckptd_checkpoint(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        h = run.checkpoint(state, step=i)
        t1 = time.perf_counter()
        h.wait()
        t2 = time.perf_counter()
        for k, v in h.timings.items():
            phases.setdefault(k, []).append(v)
        return t1 - t0, t2 - t0

    def async_save(i: int, **kw: Any) -> tuple[float, float]:
        t0 = time.perf_counter()
        fut = dcp.async_save(state, checkpoint_id=os.fspath(tmp / f"a{i}"), **kw)
        t1 = time.perf_counter()
        fut.result()
        return t1 - t0, time.perf_counter() - t0

    def save_fsync(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp / f"s{i}", sync_files=True))
        if rank == 0:
            fd = os.open(tmp / f"s{i}", os.O_RDONLY)
            os.fsync(fd)  # the directory's entries: DCP itself does not
            os.close(fd)
        dist.barrier()
        t = time.perf_counter() - t0
        return t, t

    def dd_fsync(i: int) -> tuple[float, float]:
        t = dd(tmp / "dd.bin", args.mib) if rank == 0 else 0.0
        return t, t

    same = tmp / "same.bin"  # random bytes, in the page cache: what the ranks write
    if rank == 0:
        with open(same, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))

    def dd_same(i: int) -> tuple[float, float]:
        t = dd(tmp / "dd.bin", args.mib, os.fspath(same)) if rank == 0 else 0.0
        return t, t

    cases = {"ckptd": ckptd_checkpoint, "dcp.async_save": async_save,
             "async_save+stager": lambda i: async_save(i, async_stager=stager),
             "dcp.save+fsync": save_fsync, "dd conv=fsync": dd_fsync,
             "dd same bytes": dd_same}
    names = list(cases)
    for i in range(args.repeat):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotated each round
            if rank == 0:
                os.sync()  # each case from a quiet disk (see bench/checkpoint.py settle)
            time.sleep(args.settle)
            dist.barrier()
            rows.setdefault(name, []).append(cases[name](i))
            dist.barrier()
            if rank == 0:
                for d in (f"a{i}", f"s{i}"):
                    shutil.rmtree(tmp / d, ignore_errors=True)
    dist.barrier()
    if rank == 0:
        out: dict[str, Any] = {k: [statistics.median(v[0] for v in vals),
                                   statistics.median(v[1] for v in vals)]
                               for k, vals in rows.items()}
        out["phases"] = {k: statistics.median(v) for k, v in phases.items()}
        print(TAG + json.dumps(out), flush=True)
    run.finish()
    dist.destroy_process_group()


def dd(path: Path, mib: int, src: str = "/dev/zero") -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={src}", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync"],
                   check=True, capture_output=True)
    t = time.perf_counter() - t0
    path.unlink()
    return t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=1024, help="total state over all ranks")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds of quiet (after a sync) before each case")
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    root = Path(tempfile.mkdtemp(prefix="ckptd-dist-bench-", dir=args.dir))
    home, files = root / "home", root / "files"
    files.mkdir()
    env = dict(os.environ, CKPTD_HOME=os.fspath(home), OMP_NUM_THREADS="1")
    print(f"{args.mib} MiB total state, ranks {args.ranks}, median of {args.repeat} rounds; "
          f"files in {root}; load average {os.getloadavg()}", flush=True)
    results: dict[int, dict[str, list[float]]] = {}
    phases: dict[int, dict[str, float]] = {}
    try:
        for world in args.ranks:
            proc = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={world}", __file__, "--worker", "--mib", str(args.mib),
                 "--repeat", str(args.repeat), "--settle", str(args.settle),
                 "--files", os.fspath(files)],
                env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{world} ranks failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
            results[world] = json.loads(line[len(TAG):])
            phases[world] = results[world].pop("phases")
    finally:
        subprocess.run([sys.executable, "-m", "ckptd", "--home", os.fspath(home), "stop"],
                       capture_output=True, env=env)
        shutil.rmtree(root, ignore_errors=True)
    print("dcp.save+fsync = FileSystemWriter(sync_files=True) + an fsync of the directory "
          "(fsyncs added: DCP does not fsync the directory); dd = one stream of the same "
          "total bytes")
    print(f"{'ranks':>5} {'':18} {'blocked s':>10} {'durable s':>10}")
    for world, r in results.items():
        for name, (blocked, durable) in r.items():
            print(f"{world:>5} {name:18} {blocked:10.3f} {durable:10.3f}")
    for world, ph in phases.items():
        print(f"{world} ranks, ckptd phases of rank 0 (median s): "
              + ", ".join(f"{k} {v:.3f}" for k, v in ph.items()))
    for world, r in results.items():
        print(f"{world} ranks: ckptd blocked / async_save blocked = "
              f"{r['ckptd'][0] / r['dcp.async_save'][0]:.2f} (target <= 1.2), "
              f"/ async_save+stager {r['ckptd'][0] / r['async_save+stager'][0]:.2f}; "
              f"ckptd durable / dd = {r['ckptd'][1] / r['dd conv=fsync'][1]:.2f} "
              f"(target <= 1.3), / dd same bytes "
              f"{r['ckptd'][1] / r['dd same bytes'][1]:.2f}; ckptd durable / dcp.save+fsync = "
              f"{r['ckptd'][1] / r['dcp.save+fsync'][1]:.2f}")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
