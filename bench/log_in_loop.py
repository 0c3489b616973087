"""What ``run.log()`` costs inside a real training loop, next to a JSON line.

Each step: 3 matmuls of 384x384 (torch on 2 threads), then the logging call
under test, timed alone; the step's compute is timed separately, so a
logger that steals cores from torch (its own threads, the daemon's wake-ups)
shows up as a slower step even when the call itself is quick. In one process,
interleaved, median over rounds:

* ``none``: no logging (the loop's own step time);
* ``json``: one JSON line written and flushed per step (the baseline);
* ``ckptd``: ``run.log()`` to a real daemon in a temporary home;
* ``ckptd+commits``: the same while the daemon is busy committing: a
  ``--commit-mib`` checkpoint requested every ``--commit-every`` steps
  (between the timed parts, not waited for); its mean step time against
  ``none`` is what the daemon's commits cost the loop;
* ``none+dd writes``: no logging, and ``dd conv=fsync`` of the same bytes at
  the same steps: what writing them to the disk costs the loop without
  ckptd (on 2 cores both of which torch uses, any writer slows the steps);
* ``wandb`` (offline) / ``tensorboard``: when installed, else skipped.

    python bench/log_in_loop.py [--steps 3000] [--rounds 3]

Targets (issue 11): ckptd p50 <= 1.5x json p50, p99 <= 3x json p99, step
time with ckptd within noise of ``none``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from log_latency import start_daemon  # noqa: E402 - the bench's own daemon starter

Logger = Callable[[dict[str, float], int], None]


def pct(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0  # ns -> us


def loop(steps: int, log: Logger | None,
         every: Callable[[int], None] | None = None) -> tuple[list[int], list[int]]:
    """(log latencies, compute step times) in ns; ``every(step)`` runs after
    the step's timed parts (the checkpoint requests of ``ckptd+commits``)."""
    a = torch.randn(384, 384)
    b = torch.randn(384, 384)
    lat: list[int] = []
    comp: list[int] = []
    clock = time.perf_counter_ns
    for step in range(steps):
        t0 = clock()
        c = a @ b
        c = c @ b
        c = c @ a
        loss = float(c[0, 0])
        t1 = clock()
        comp.append(t1 - t0)
        if log is not None:
            log({"loss": loss, "lr": 3e-4, "grad_norm": 0.5, "tokens": step * 512.0}, step)
            lat.append(clock() - t1)
        if every is not None:
            every(step)
    return lat, comp


def json_logger(path: Path) -> tuple[Logger, Callable[[], None]]:
    f = open(path, "w")  # noqa: SIM115 - closed by the returned closer

    def log(m: dict[str, float], step: int) -> None:
        f.write(json.dumps({"step": step, **m}) + "\n")
        f.flush()

    return log, f.close


def optional_loggers(tmp: Path) -> dict[str, Callable[[], tuple[Logger, Callable[[], None]]]]:
    out: dict[str, Callable[[], tuple[Logger, Callable[[], None]]]] = {}
    try:
        import wandb

        def make_wandb() -> tuple[Logger, Callable[[], None]]:
            r = wandb.init(mode="offline", dir=os.fspath(tmp), project="bench")
            return (lambda m, s: r.log(m, step=s)), r.finish
        out["wandb offline"] = make_wandb
    except ImportError:
        print("wandb not installed: skipped")
    try:
        from torch.utils.tensorboard import SummaryWriter

        def make_tb() -> tuple[Logger, Callable[[], None]]:
            w = SummaryWriter(os.fspath(tmp / f"tb-{time.monotonic_ns()}"))

            def log(m: dict[str, float], s: int) -> None:
                for k, v in m.items():
                    w.add_scalar(k, v, s)
            return log, w.close
        out["tensorboard"] = make_tb
    except ImportError:
        print("tensorboard not installed: skipped")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--commit-mib", type=int, default=128,
                    help="state checkpointed by the ckptd+commits case")
    ap.add_argument("--commit-every", type=int, default=300,
                    help="steps between its checkpoints (the daemon stays busy committing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir="/var/tmp"))
    home = tmp / "home"
    home.mkdir(mode=0o700)
    os.environ.pop("CKPTD_RUN_ID", None)
    os.environ["CKPTD_HOME"] = os.fspath(home)
    import ckptd_client

    daemon = start_daemon(home)
    results: dict[str, list[dict[str, float]]] = {}
    extra = optional_loggers(tmp)
    try:
        def ckptd_logger() -> tuple[Logger, Callable[[], None]]:
            run = ckptd_client.init(name="loop", home=home)
            return (lambda m, s: run.log(m, step=s)), run.finish

        state = {"w": torch.randn(args.commit_mib << 18)}
        commits: list[Any] = []

        def ckptd_committing() -> tuple[Logger, Callable[[], None]]:
            """run.log() while the daemon commits a checkpoint every
            --commit-every steps: the requests are made between steps and
            not waited for, so only the daemon's work can slow the steps."""
            run = ckptd_client.init(name="loop-commits", home=home)
            commits.append(run)
            return (lambda m, s: run.log(m, step=s)), run.finish

        def request(step: int) -> None:
            if commits and step % args.commit_every == args.commit_every - 1:
                commits[-1].checkpoint(state, step=step)

        # the baseline for ckptd+commits: the same bytes written by dd (conv=fsync)
        # at the same steps, from a file in the page cache: what writing them
        # to this disk costs the loop with no hashing and no ckptd at all
        same = tmp / "same.bin"
        with open(same, "wb") as f:
            f.write(state["w"].numpy().tobytes())
        dds: list[subprocess.Popen[bytes]] = []

        def dd_request(step: int) -> None:
            if step % args.commit_every == args.commit_every - 1:
                if dds:
                    dds.pop().wait()  # one at a time, as the daemon commits them
                dds.append(subprocess.Popen(
                    ["dd", f"if={same}", f"of={tmp / 'dd.bin'}", "bs=1M", "conv=fsync",
                     "status=none"]))

        makers: dict[str, Callable[[], tuple[Logger, Callable[[], None]]] | None] = {
            "none": None, "json": lambda: json_logger(tmp / "b.jsonl"),
            "ckptd": ckptd_logger, "ckptd+commits": ckptd_committing,
            "none+dd writes": None, **extra}
        loop(300, None)  # warm-up: torch's threads, first allocations
        for r in range(args.rounds):
            for name, make in makers.items():
                log, close = make() if make else (None, lambda: None)
                if r == 0 and log is not None:
                    loop(200, log)  # warm-up: imports, first connection
                lat, comp = loop(args.steps, log, {"ckptd+commits": request,
                                                   "none+dd writes": dd_request}.get(name))
                close()
                commits.clear()
                while dds:
                    dds.pop().wait()
                row = {"step_p50": pct(comp, 0.5), "step_p99": pct(comp, 0.99),
                       "step_mean": statistics.fmean(comp) / 1000.0}
                if lat:
                    row.update(p50=pct(lat, 0.5), p99=pct(lat, 0.99))
                results.setdefault(name, []).append(row)
            print(f"round {r} done", file=sys.stderr, flush=True)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    print(f"log() in a training loop: {args.steps} steps x 3 matmul 384^2, torch threads "
          f"{args.threads}, {os.cpu_count()} CPUs, median of {args.rounds} rounds, "
          f"load average {os.getloadavg()}")
    print(f"{'logger':<16} {'log p50 us':>10} {'log p99 us':>10} {'step p50 us':>11} "
          f"{'step p99 us':>11} {'step mean us':>12}")
    for n, m in med.items():
        print(f"{n:<16} {m.get('p50', 0):10.1f} {m.get('p99', 0):10.1f} {m['step_p50']:11.1f} "
              f"{m['step_p99']:11.1f} {m['step_mean']:12.1f}")
    c, j, z, b = med["ckptd"], med["json"], med["none"], med["ckptd+commits"]
    for what, r, target in (("ckptd p50 / json p50", c["p50"] / j["p50"], 1.5),
                            ("ckptd p99 / json p99", c["p99"] / j["p99"], 3.0),
                            ("ckptd step p50 / none step p50",
                             c["step_p50"] / z["step_p50"], 1.1),
                            ("ckptd+commits step mean / none step mean",
                             b["step_mean"] / z["step_mean"], 1.1),
                            ("ckptd+commits step mean / none+dd writes step mean",
                             b["step_mean"] / med["none+dd writes"]["step_mean"], 1.1)):
        print(f"  {what} = {r:.2f}  [<= {target}] {'ok' if r <= target else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
