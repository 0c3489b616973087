"""How the views hold up on a big run: ``python bench/views.py [--points N]``.

Builds a synthetic store (one run, ``N`` points of ``loss``, two attempts,
a checkpoint every 10 k steps) in a temporary home through the daemon's
write path (:class:`ckptd.store.writer.Store`), then times what a user waits for:

* ``series``: one full-range downsample (what every view asks first);
* ``ui``: the chart-data request of ``ckptd ui`` over HTTP, token included:
  the first one a new server answers, and later ones;
* ``plot``: ``ckptd plot RUN --key loss -o x.png`` end to end (a new process);
* ``watch``: first frame of ``ckptd watch`` in a real tmux, from starting the
  process until the chart (braille dots) and the key name are on the screen,
  when tmux is there.

Each number is the median of ``--rounds`` (3) tries; the load average is
printed before and after (the box is shared: read the numbers with it).
``--home DIR`` keeps the generated store there for the next round.

Targets from issue #12 (5 M points): watch < 1 s, ui request < 300 ms, plot < 5 s.
Not part of the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "client")]

from ckptd_client import paths, protocol  # noqa: E402

from ckptd.store.writer import Store  # noqa: E402

RUN = "20260101-000000-000001"


def build(home: Path, points: int) -> None:
    """A run of ``points`` effective steps of ``loss``: attempt 1 logged to 42 % and
    was resumed by attempt 2 from its checkpoint at 40 % (the 2 % in between is
    superseded, as after a real crash); a committed checkpoint every 10 k steps.

    Written through the daemon's own write path (``Store.apply``, protocol
    messages), not into the tables: the bench follows the schema as it changes.
    """
    store = Store(paths.db_path(home))
    store.conn.execute("PRAGMA synchronous=OFF")  # a bench store: no power cut to survive
    t0 = 1.7e9
    resume = int(points * 0.4)
    overrun = resume + points // 50

    def logs(attempt: int, first: int, last: int, seq: int) -> None:
        for lo in range(first, last + 1, 50_000):
            with store.transaction():
                store.apply([(RUN, attempt, "c", {
                    "t": protocol.LOG, "seq": seq + s, "step": s, "time": t0 + s * 0.01,
                    "m": {"loss": 2.0 / (1 + s / 1e5) + (s % 97) * 1e-3 + (attempt - 1) * 0.01},
                }) for s in range(lo, min(lo + 50_000, last + 1))])

    register = {"t": protocol.REGISTER, "seq": 1, "time": t0, "name": "big", "pid": 1,
                "command": ["python", "train.py"], "cwd": "/tmp",
                "config": {"total_steps": points * 2}}
    with store.transaction():
        store.ensure_run(RUN, 1)
        store.apply([(RUN, 1, "c", register)])
    logs(1, 0, overrun, 2)
    with store.transaction():
        store.ensure_run(RUN, 2)
        store.apply([(RUN, 2, "c", dict(register, joined=True, time=t0 + overrun * 0.01)),
                     (RUN, 2, "c", {"t": protocol.RESTORED, "seq": 2, "step": resume,
                                    "time": t0 + overrun * 0.01})])
    logs(2, resume + 1, points - 1, 3)
    with store.transaction():
        for s in range(0, resume + 1, 10_000):
            store.put_checkpoint({"run_id": RUN, "step": s, "attempt": 1, "path": "x",
                                  "status": "committed", "bytes": 1, "created": t0 + s * 0.01})
        for s in range(resume + 10_000, points, 10_000):
            store.put_checkpoint({"run_id": RUN, "step": s, "attempt": 2, "path": "x",
                                  "status": "committed", "bytes": 1, "created": t0 + s * 0.01})
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()


def timed(fn):  # noqa: ANN001, ANN201
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def ms(values: list[float]) -> str:
    """Median (and the spread) of ``values`` seconds, in ms."""
    return (f"median {statistics.median(values) * 1000:.0f} ms (min {min(values) * 1000:.0f},"
            f" max {max(values) * 1000:.0f}, n={len(values)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=5_000_000)
    ap.add_argument("--rounds", type=int, default=3, help="timings per number (median shown)")
    ap.add_argument("--keep", action="store_true", help="keep the home (prints its path)")
    ap.add_argument("--home", type=Path, help="reuse this home's store (built there if absent;"
                    " kept): a 5 M-point store takes a minute to build")
    ap.add_argument("--build-only", action="store_true", help="build the store and stop")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ckptd-bench-views-"))
    home = args.home or tmp / "home"
    home.mkdir(mode=0o700, exist_ok=True)
    # PYTHONSAFEPATH: `python -m ckptd` imports this checkout's ckptd, not one
    # in the directory the bench was started from
    env = dict(os.environ, CKPTD_HOME=str(home), PYTHONPATH=f"{REPO}:{REPO / 'client'}",
               PYTHONSAFEPATH="1")
    try:
        if paths.db_path(home).exists():
            print(f"reusing {paths.db_path(home)}")
        else:
            print(f"building {args.points:,} points ...", flush=True)
            print(f"build: {timed(lambda: build(home, args.points)):.1f} s")
        if args.build_only:
            return
        # what an installed ckptd has: compiled modules (PYTHONDONTWRITEBYTECODE
        # would have every new process compile ckptd's sources again)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "ckptd"),
                        str(REPO / "client" / "ckptd_client")], check=True)
        from ckptd.store.query import Reader
        from ckptd.views import series

        n = args.rounds
        print(f"{args.points:,} points, {os.cpu_count()} CPUs, {load()}")
        with Reader(home) as reader:
            dt = [timed(lambda: series.downsample(reader, RUN, "loss", 800)) for _ in range(n)]
            print(f"series: full-range downsample, 800 buckets: {ms(dt)}")
            dt = [timed(lambda: series.downsample(reader, RUN, "loss", 800, lo=0, hi=199_999))
                  for _ in range(n)]
            print(f"series: 200 k-step zoom, exact min/max: {ms(dt)}")
            dt = [timed(lambda: series.run_rows(reader)) for _ in range(n)]
            print(f"series: runs table: {ms(dt)}")
        bench_ui(home, env, n)
        out = tmp / "x.png"
        dt = [timed(lambda: subprocess.run(
            [sys.executable, "-m", "ckptd", "plot", RUN, "--key", "loss", "-o", str(out)],
            env=env, check=True, capture_output=True)) for _ in range(n)]
        print(f"plot: PNG, new process each: {ms(dt)} ({out.stat().st_size} bytes)")
        bench_watch(env, n)
        print(f"done, {load()}")
    finally:
        if args.keep or args.home:
            print(f"home kept: {home}")
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def bench_ui(home: Path, env: dict[str, str], rounds: int) -> None:
    """Per round a new ``ckptd ui`` process: its first chart request (what a page
    opened right after start waits for), then 4 more."""
    firsts, rest = [], []
    size = 0
    for _ in range(rounds):
        proc = subprocess.Popen([sys.executable, "-m", "ckptd", "ui", "--port", "0"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout is not None
            url = ""
            while not url.startswith("http"):
                url = proc.stdout.readline().strip().split()[-1]
            base, token = url.split("/?token=")
            api = f"{base}/api/series?run={RUN}&key=loss&buckets=800&token={token}"
            for i in range(5):
                t = time.perf_counter()
                with urllib.request.urlopen(api) as resp:
                    size = len(resp.read())
                (rest if i else firsts).append(time.perf_counter() - t)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"ui: chart-data request, 800 buckets ({size} bytes): first of a new server "
          f"{ms(firsts)}; later {ms(rest)}")


def bench_watch(env: dict[str, str], rounds: int) -> None:
    """From tmux starting the process to the chart on the screen (braille dots and
    the key's name captured from the pane), per round a new process."""
    if not shutil.which("tmux"):
        print("watch: skipped (no tmux)")
        return
    cmd = f"{sys.executable} -m ckptd watch {RUN}"
    envs = [a for k in ("CKPTD_HOME", "PYTHONPATH", "PYTHONSAFEPATH") if k in env
            for a in ("-e", f"{k}={env[k]}")]
    took, cpu = [], []
    for i in range(rounds):
        tmux = ["tmux", "-L", f"ckptd-bench-{os.getpid()}-{i}"]  # a new server each round
        t = time.perf_counter()
        subprocess.run([*tmux, "new-session", "-d", "-x", "120", "-y", "40", *envs, cmd],
                       check=True)
        try:
            pid = subprocess.run([*tmux, "display", "-p", "#{pane_pid}"], capture_output=True,
                                 text=True).stdout.strip()
            while time.perf_counter() - t < 30:
                screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True,
                                        text=True).stdout
                if "loss" in screen and sum("\u2800" < ch <= "\u28ff" for ch in screen) > 20:
                    took.append(time.perf_counter() - t)
                    cpu.append(cpu_s(pid))
                    break
                time.sleep(0.02)
            else:
                print("watch: no chart within 30 s")
        finally:
            subprocess.run([*tmux, "kill-server"], capture_output=True)
    if took:
        print(f"watch: first frame with the chart, process start included: {ms(took)}")
    if all(c is not None for c in cpu) and cpu:
        print(f"watch: CPU time the process had used by then: {ms(cpu)}  (the wall time "
              "on an idle box; on a loaded one the wall time is this over the CPU share)")


def cpu_s(pid: str) -> float | None:
    """Seconds process ``pid`` has run on a CPU, all its threads (the scheduler's
    nanosecond count, ``/proc/PID/task/*/schedstat``), None where unreadable."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    main()
