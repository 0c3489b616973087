"""The daemon's commit write alone (issue 11: "durable time is the disk's, not
the CPU's"): ``write_data`` (blake3 + xxh3-128 hashed in the writing pass,
writeback started per chunk, fsync) against ``dd conv=fsync`` of the same
bytes from the same memfd, and a plain write + fsync without hashing.

Each measurement starts from a synced, quiet disk (``--settle`` seconds),
the order of the three rotates every rep, and the ratio is taken per rep
(the neighbours share the disk's mood) and then its median: this virtual
disk alternates between two speeds (1 GiB ``dd``: ~0.56 s or ~1.1 s), and
ratios of medians taken minutes apart measured the disk, not the code.

    python bench/durable_write.py --mib 1024 --reps 5
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def plain(fd: int, size: int, path: Path, piece: int = 1 << 20) -> None:
    """write + fsync in the daemon's piece size, no hash, no early writeback."""
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    view = memoryview(mm)
    off = 0
    while off < size:
        off += os.write(out, view[off:min(off + piece, size)])
    view.release()
    os.fsync(out)
    os.close(out)
    mm.close()


def dd(fd: int, size: int, path: Path) -> None:
    subprocess.run(["dd", f"if=/proc/{os.getpid()}/fd/{fd}", f"of={path}", "bs=1M",
                    f"count={size >> 20}", "conv=fsync", "status=none"], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--settle", type=float, default=3.0)
    args = ap.parse_args()
    from ckptd.daemon.checkpoints import write_data

    size = args.mib << 20
    fd = os.memfd_create("bench")
    os.ftruncate(fd, size)
    with os.fdopen(os.dup(fd), "r+b", buffering=0) as f:
        for _ in range(args.mib):  # a different MiB each time: no dedup/compression luck
            f.write(os.urandom(1 << 20))
    cands: dict[str, Callable[[int, int, Path], object]] = {
        "write_data (daemon: hash + write + fsync)": write_data,
        "dd same bytes conv=fsync": dd,
        "plain write+fsync (no hash)": plain,
        "16 MiB writes+fsync (as torch.save)": lambda fd, size, p: plain(fd, size, p, 16 << 20)}
    names = list(cands)
    times: dict[str, list[float]] = {k: [] for k in cands}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        for rep in range(args.reps + 1):  # rep 0 warms up
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                p = Path(d) / "out.bin"
                os.sync()
                time.sleep(args.settle)
                t0 = time.perf_counter()
                cands[name](fd, size, p)
                if rep:
                    times[name].append(time.perf_counter() - t0)
                p.unlink()
    base = "dd same bytes conv=fsync"
    print(f"{args.mib} MiB from a memfd to /var/tmp, {args.reps} reps, "
          f"load average {os.getloadavg()}")
    print(f"  {'':<42} {'median s':>8} {'min s':>7}  per-rep ratio to dd (median)")
    for k, v in times.items():
        ratio = statistics.median(a / b for a, b in zip(v, times[base], strict=True))
        print(f"  {k:<42} {statistics.median(v):8.3f} {min(v):7.3f}  {ratio:5.2f}  "
              f"{' '.join(f'{x:.2f}' for x in v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
