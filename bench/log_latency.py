"""How much a ``run.log()`` call costs the training loop, next to a JSON-lines baseline.

Starts a real daemon in a temporary home, logs STEPS steps of 4 scalars through
the real client, and prints ``log()`` p50/p99 and the sustained rate of durably
committed events (time from the first ``log()`` until ``flush()`` returns:
``flush()`` returning means the daemon committed everything with
``synchronous=FULL``). Next to it, in the same process and on the same disk, the
baseline most scripts start with: one JSON line written and flushed to a file
per step. That baseline is never fsynced, so its loop rate is compared with
ckptd's loop rate (how fast ``log()`` returns), never with ckptd's durably
committed rate, which has no baseline here. Ratios at the end; the targets of
issue 2 are printed with them.

    python bench/log_latency.py [--steps 20000] [--rounds 3] [--profile]

Not a test: numbers depend on the machine and its load. Each round runs the
baseline and ckptd back to back; the median round is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ckptd_client
from ckptd_client import paths


def values(step: int) -> dict[str, float | int]:
    return {"loss": 1.0 / (step + 1), "lr": 3e-4, "grad_norm": 0.5 + step % 7, "tokens": step * 512}


def percentile(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0  # ns -> us


def baseline(path: Path, steps: int) -> tuple[list[int], float]:
    """One JSON line written and flushed per step: what logging to a file costs."""
    lat: list[int] = []
    clock = time.perf_counter_ns
    with open(path, "w") as f:
        start = time.perf_counter()
        for step in range(steps):
            t0 = clock()
            f.write(json.dumps({"step": step, **values(step)}) + "\n")
            f.flush()
            lat.append(clock() - t0)
        elapsed = time.perf_counter() - start
    return lat, elapsed


def ckptd_round(home: Path, steps: int, name: str) -> tuple[list[int], float, float]:
    """Latencies of run.log(), seconds until the loop ended, seconds until flush() returned."""
    lat: list[int] = []
    clock = time.perf_counter_ns
    run = ckptd_client.init(name=name, home=home)
    try:
        start = time.perf_counter()
        for step in range(steps):
            v = values(step)
            t0 = clock()
            run.log(v, step=step)
            lat.append(clock() - t0)
        loop = time.perf_counter() - start
        run.flush(timeout=120)
        durable = time.perf_counter() - start
    finally:
        run.finish()
    return lat, loop, durable


def start_daemon(home: Path) -> subprocess.Popen[bytes]:
    log = open(home / paths.DAEMON_LOG, "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen([sys.executable, "-m", "ckptd.daemon", "--home", os.fspath(home)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    log.close()
    sock = paths.socket_path(home)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(os.fspath(sock))
            return proc
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    proc.kill()
    raise SystemExit(f"daemon did not start; see {home / paths.DAEMON_LOG}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile one extra ckptd round and print the top functions")
    parser.add_argument("--dir", default=None, help="where the temporary home goes")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=args.dir))
    home = tmp / "home"
    home.mkdir(mode=0o700)
    os.environ.pop("CKPTD_RUN_ID", None)
    os.environ["CKPTD_HOME"] = os.fspath(home)
    daemon = start_daemon(home)
    rounds = []
    try:
        # warm-up: imports, first connection, SQLite pages
        ckptd_round(home, 2000, "warmup")
        baseline(tmp / "warmup.jsonl", 2000)
        for r in range(args.rounds):
            b_lat, b_elapsed = baseline(tmp / f"baseline-{r}.jsonl", args.steps)
            c_lat, c_loop, c_durable = ckptd_round(home, args.steps, f"bench-{r}")
            rounds.append({
                "base_p50": percentile(b_lat, 0.50), "base_p99": percentile(b_lat, 0.99),
                "base_loop_rate": args.steps / b_elapsed,
                "p50": percentile(c_lat, 0.50), "p99": percentile(c_lat, 0.99),
                "p999": percentile(c_lat, 0.999), "max": max(c_lat) / 1000.0,
                "loop_s": c_loop, "durable_s": c_durable,
            })
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            ckptd_round(home, args.steps, "profile")
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    if code != 0:
        print(f"warning: the daemon exited with status {code}", file=sys.stderr)

    # the median of each figure over the rounds: one unlucky round (another
    # process taking the CPU) moves none of them
    m = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    n_values = args.steps * len(values(0))
    log_rate = args.steps / m["durable_s"]
    value_rate = n_values / m["durable_s"]
    print(f"ckptd log() latency, {args.steps} steps x {len(values(0))} scalars, "
          f"median of {args.rounds} rounds ({os.cpu_count()} CPUs)")
    print(f"  baseline (JSON line + flush per step): p50 {m['base_p50']:7.2f} us"
          f"   p99 {m['base_p99']:7.2f} us   loop {m['base_loop_rate']:,.0f} steps/s"
          " (page cache only, not durable)")
    print(f"  ckptd run.log()                      : p50 {m['p50']:7.2f} us"
          f"   p99 {m['p99']:7.2f} us   loop {args.steps / m['loop_s']:,.0f} steps/s"
          f"   p99.9 {m['p999']:.1f} us   max {m['max']:.0f} us")
    print(f"  ckptd committed durably (first log() -> flush() returned, {m['durable_s']:.3f} s;"
          " fsynced, no baseline above is):")
    print(f"      {log_rate:,.0f} log() events/s = {value_rate:,.0f} metric values/s"
          f" = {log_rate + value_rate:,.0f} events+values/s")
    print("ratios and targets:")
    ratio = m["p50"] / m["base_p50"]
    print(f"  p50 / baseline p50 = {ratio:.2f}   (target <= 3)   "
          f"{'ok' if ratio <= 3 else 'MISSED'}")
    print(f"  p99 = {m['p99']:.1f} us            (target <= 50 us) "
          f"{'ok' if m['p99'] <= 50 else 'MISSED'}")
    events = log_rate + value_rate  # the issue counts both log() calls and metric values
    print(f"  committed {events:,.0f} events/s ({log_rate:,.0f} log() calls + "
          f"{value_rate:,.0f} values)   (target >= 100,000 events/s) "
          f"{'ok' if events >= 100_000 else 'MISSED'}")
    print("per-round: " + json.dumps([{k: round(v, 2) for k, v in r.items()} for r in rounds]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
