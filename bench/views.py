"""How the views hold up on a big run: ``python bench/views.py [--points N]``.

Builds a synthetic store (one run, ``N`` points of ``loss``, two attempts,
a checkpoint every 10 k steps) in a temporary home with the real schema
(:class:`ckptd.store.Store`), then times what a user waits for:

* ``series``: one full-range downsample (what every view asks first);
* ``ui``: the chart-data request of ``ckptd ui`` over HTTP, token included;
* ``plot``: ``ckptd plot RUN --key loss -o x.png`` end to end (a new process);
* ``watch``: first frame of ``ckptd watch`` in a real tmux (until the chart
  and the key name are on the screen), when tmux is there.

Targets from issue #12 (5 M points): watch < 1 s, ui request < 300 ms, plot < 5 s.
Not part of the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "client")]

from ckptd_client import paths  # noqa: E402

from ckptd.store.writer import Store  # noqa: E402

RUN = "20260101-000000-000001"


def build(home: Path, points: int) -> None:
    """A run of ``points`` steps logged by two attempts (resumed at 40 %)."""
    store = Store(paths.db_path(home))
    store.close()
    conn = sqlite3.connect(paths.db_path(home))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    t0 = 1.7e9
    resume = int(points * 0.4)
    conn.execute("INSERT INTO runs (id, name, status, attempt, step, started, config)"
                 " VALUES (?, 'big', 'running', 2, ?, ?, ?)",
                 (RUN, points - 1, t0, json.dumps({"total_steps": points * 2})))
    conn.execute("INSERT INTO attempts VALUES (?, 1, ?, ?, 1, 'interrupted', NULL, 9, NULL)",
                 (RUN, t0, t0 + resume * 0.01))
    conn.execute("INSERT INTO attempts VALUES (?, 2, ?, NULL, 2, 'running', NULL, NULL, ?)",
                 (RUN, t0 + resume * 0.01, resume))

    def rows():  # noqa: ANN202
        for s in range(points):
            attempt = 1 if s <= resume else 2
            yield (RUN, attempt, "c", s + 1, "loss", s, 2.0 / (1 + s / 1e5) + (s % 97) * 1e-3,
                   t0 + s * 0.01, 0)

    conn.executemany("INSERT INTO metrics (run_id, attempt, src, seq, key, step, value, time,"
                     " superseded) VALUES (?,?,?,?,?,?,?,?,?)", rows())
    conn.executemany("INSERT INTO checkpoints (run_id, step, attempt, status, path, bytes,"
                     " created) VALUES (?, ?, 1, 'committed', 'x', 1, ?)",
                     [(RUN, s, t0 + s * 0.01) for s in range(0, points, 10_000)])
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def timed(fn):  # noqa: ANN001, ANN201
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=5_000_000)
    ap.add_argument("--keep", action="store_true", help="keep the home (prints its path)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ckptd-bench-views-"))
    home = tmp / "home"
    home.mkdir(mode=0o700)
    env = dict(os.environ, CKPTD_HOME=str(home), PYTHONPATH=f"{REPO}:{REPO / 'client'}")
    try:
        print(f"building {args.points:,} points ...", flush=True)
        print(f"build: {timed(lambda: build(home, args.points)):.1f} s")
        from ckptd.store.query import Reader
        from ckptd.views import series

        with Reader(home) as reader:
            dt = timed(lambda: series.downsample(reader, RUN, "loss", 800))
            print(f"series: full-range downsample, 800 buckets: {dt * 1000:.0f} ms")
            dt = timed(lambda: series.downsample(reader, RUN, "loss", 800, lo=0, hi=200_000))
            print(f"series: 200 k-step zoom, exact min/max: {dt * 1000:.0f} ms")
            dt = timed(lambda: series.run_rows(reader))
            print(f"series: runs table: {dt * 1000:.0f} ms")
        bench_ui(home, env)
        out = tmp / "x.png"
        dt = timed(lambda: subprocess.run(
            [sys.executable, "-m", "ckptd", "plot", RUN, "--key", "loss", "-o", str(out)],
            env=env, check=True, capture_output=True))
        print(f"plot: {dt:.2f} s (new process, PNG {out.stat().st_size} bytes)")
        bench_watch(env)
    finally:
        if args.keep:
            print(f"home kept: {home}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def bench_ui(home: Path, env: dict[str, str]) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ckptd", "ui", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = ""
        while not url.startswith("http"):
            url = proc.stdout.readline().strip().split()[-1]
        base, token = url.split("/?token=")
        api = f"{base}/api/series?run={RUN}&key=loss&buckets=800&token={token}"
        times = []
        for _ in range(5):
            t = time.perf_counter()
            with urllib.request.urlopen(api) as resp:
                body = resp.read()
            times.append(time.perf_counter() - t)
        print(f"ui: chart-data request: best {min(times) * 1000:.0f} ms, first "
              f"{times[0] * 1000:.0f} ms ({len(body)} bytes)")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bench_watch(env: dict[str, str]) -> None:
    if not shutil.which("tmux"):
        print("watch: skipped (no tmux)")
        return
    sock = f"ckptd-bench-{os.getpid()}"
    tmux = ["tmux", "-L", sock]
    cmd = f"{sys.executable} -m ckptd watch {RUN}"
    envs = [a for k in ("CKPTD_HOME", "PYTHONPATH") for a in ("-e", f"{k}={env[k]}")]
    t = time.perf_counter()
    subprocess.run([*tmux, "new-session", "-d", "-x", "120", "-y", "40", *envs, cmd],
                   check=True)
    try:
        while time.perf_counter() - t < 30:
            screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True,
                                    text=True).stdout
            if "loss" in screen and any("\u2800" < ch <= "\u28ff" for ch in screen):
                print(f"watch: first frame with the chart {time.perf_counter() - t:.2f} s "
                      "(process start included)")
                return
            time.sleep(0.02)
        print("watch: no chart within 30 s")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


if __name__ == "__main__":
    main()
