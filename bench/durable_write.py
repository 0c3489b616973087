"""The daemon's commit write alone: ``write_data`` (blake3 hashed in the writing
pass) against plain write + fsync of the same memfd (no hash), and, with
``--old PATH`` (a checkout of the previous code), the old ``write_data``
(sha256 + crc32 in hash threads). Interleaved, median of ``--reps``.

    python bench/durable_write.py --mib 256 --reps 3 [--old /tmp/perf-before]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def plain(fd: int, size: int, path: Path) -> None:
    import mmap

    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    view = memoryview(mm)
    off = 0
    while off < size:
        off += os.write(out, view[off:min(off + (1 << 20), size)])
    view.release()
    os.fsync(out)
    os.close(out)
    mm.close()


def load_old(root: str) -> object:
    """The old ckptd.checkpoints module, under its own name, next to the new one."""
    spec = importlib.util.spec_from_file_location("old_checkpoints",
                                                  os.path.join(root, "ckptd", "checkpoints.py"))
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "ckptd"
    sys.modules["old_checkpoints"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--old", default=None)
    args = ap.parse_args()
    from ckptd.daemon import checkpoints as new

    size = args.mib << 20
    fd = os.memfd_create("bench")
    os.ftruncate(fd, size)
    with os.fdopen(os.dup(fd), "r+b", buffering=0) as f:
        chunk = os.urandom(1 << 20)
        for _ in range(args.mib):
            f.write(chunk)
    cands = {"plain write+fsync": plain, "write_data (blake3, one pass)": new.write_data}
    if args.old:
        # the old hashes run on the same fmt module: give it the old CHECKS
        import hashlib
        import zlib

        from ckptd_client.checkpoint import format as fmt
        old = load_old(args.old)
        old_checks = {"sha256": lambda v: hashlib.sha256(v).hexdigest(),
                      "crc32": lambda v: f"{zlib.crc32(v):08x}"}

        def old_write(fd: int, size: int, path: Path) -> None:
            saved = fmt.CHECKS, fmt.submit_chunk_hashes
            fmt.CHECKS = old_checks  # type: ignore[assignment]

            def submit(buf: object, size: int, algo: str, pool: object = None) -> list:
                view = memoryview(buf).cast("B")  # type: ignore[arg-type]
                return [pool.submit(old_checks[algo], view[o:min(o + fmt.CHUNK, size)])  # type: ignore[union-attr]
                        for o in range(0, size, fmt.CHUNK)]
            fmt.submit_chunk_hashes = submit  # type: ignore[assignment]
            try:
                old.write_data(fd, size, path)  # type: ignore[attr-defined]
            finally:
                fmt.CHECKS, fmt.submit_chunk_hashes = saved
        cands["old write_data (sha256+crc32 threads)"] = old_write
    times: dict[str, list[float]] = {k: [] for k in cands}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        for rep in range(args.reps + 1):
            for name, fn in cands.items():
                p = Path(d) / f"{rep}-{len(times[name])}-{name[:5]}"
                t0 = time.perf_counter()
                fn(fd, size, p)
                if rep:
                    times[name].append(time.perf_counter() - t0)
                p.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain write+fsync"]
    print(f"{args.mib} MiB from a memfd to /var/tmp, median of {args.reps}, "
          f"load average {os.getloadavg()}")
    for k, v in med.items():
        print(f"  {k:<40} {v:7.3f} s   {v / base:5.2f}x plain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
