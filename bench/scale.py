"""Scale of a multi-day run (issue 11.4): store size, insert rate, and the read
side (``tail``, ``metrics``, ``ls``, ``show``) on one big run.

Two ways in, both printed and labelled:

* **client**: ``--client-points`` points (and a log line every
  ``--event-every`` steps) through the real client and daemon: the insert
  rate a training script sees.
* **bulk** (the big store): the same rows the daemon writes (register,
  ``log`` and ``event`` messages, three attempts, each resuming a little
  before the previous one's end, status lines), applied by the daemon's own
  writer (:meth:`ckptd.store.writer.Store.apply`, in transactions of
  ``--batch`` points, with the daemon's WAL bound after each) without the
  socket, so a 20 M-point store takes minutes instead of an hour.
  ``--points`` chooses its size (issue 11: 20.7 M = 5 M steps x 4 keys over 3
  attempts, 1 M log lines).

Then each read is a separate ``ckptd`` process, timed, with its peak RSS
(``os.wait4``). Run ``python bench/scale.py --points 2000000`` (the default,
a few minutes here); the home is a fresh directory under /var/tmp unless
``--home`` (reused when it has the store: ``--reuse``). The store's schema is
whatever the ckptd on ``PYTHONPATH`` writes, so the same command measures
the code before and after a change.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

KEYS = ("loss", "lr", "grad_norm", "tokens_per_s")


def daemon_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    env["CKPTD_HOME"] = os.fspath(home)
    return env


def cli(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ckptd", "--home", os.fspath(home), *args]


def measure(home: Path, *args: str, first_line: bool = False) -> dict[str, Any]:
    """Run ``ckptd ARGS``: wall time (to its first output line with
    ``first_line``, then the pipe is closed like ``| head -1``), peak RSS,
    exit status, and whether it printed a traceback."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cli(home, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=daemon_env(home), stdin=subprocess.DEVNULL, cwd=home)
    assert proc.stdout is not None and proc.stderr is not None
    if first_line:
        proc.stdout.readline()
        took = time.perf_counter() - t0
        proc.stdout.close()
        lines = 1
    else:
        lines = sum(1 for _ in proc.stdout)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if not first_line:
        took = time.perf_counter() - t0
    return {"s": took, "rss_mb": usage.ru_maxrss / 1024, "rc": proc.returncode,
            "lines": lines, "traceback": "Traceback" in err, "err": err.strip()[-200:]}


def metric_bytes(db: Path) -> tuple[int, int, int]:
    """(bytes of the metric tables and their indexes, metric points, events)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE tbl_name IN"
            " ('metrics', 'metric_points', 'metric_series', 'metric_backfill')"
            " AND type IN ('table', 'index')")]
        size = sum(conn.execute(f"SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name IN"
                                f" ({','.join('?' * len(names))})", names).fetchone())
        points = conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
        events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        return size, points, events
    finally:
        conn.close()


def wal_size(db: Path) -> int:
    try:
        return os.stat(f"{db}-wal").st_size
    except OSError:
        return 0


def bulk(home: Path, points: int, batch: int, event_every: int) -> dict[str, Any]:
    """The big run, through the daemon's writer (see the module docstring)."""
    from ckptd_client import paths, protocol

    from ckptd.store.writer import Store

    db = paths.db_path(home)
    store = Store(db)
    run_id = "scale-bulk"
    steps = points // len(KEYS)
    # three attempts; each resumes 2% before where the previous one stopped
    ends = [steps * 4 // 10, steps * 7 // 10, steps]
    back = max(1, steps // 50)
    t0 = time.perf_counter()
    wal_peak = 0
    n_points = 0
    t = 1.7e9
    start = 0
    for attempt, end in enumerate(ends, 1):
        src = f"c-{attempt:08x}"
        seq = 1
        pending: list[tuple[str, int, str, dict[str, Any]]] = [
            (run_id, attempt, src, {"t": protocol.REGISTER, "seq": seq, "time": t,
                                    "name": run_id, "pid": 1, "command": ["python", "x.py"],
                                    "cwd": "/tmp"})]
        if attempt > 1:
            seq += 1
            pending.append((run_id, attempt, src, {"t": protocol.RESTORED, "seq": seq,
                                                   "time": t, "step": start}))
        in_batch = 0
        for step in range(start, end):
            seq += 1
            t += 0.0001
            pending.append((run_id, attempt, src, {
                "t": protocol.LOG, "seq": seq, "step": step, "time": t,
                "m": {"loss": 1.0 / (step + 1), "lr": 1e-3, "grad_norm": 0.5 + step % 7,
                      "tokens_per_s": 1e5 + step % 13}}))
            in_batch += len(KEYS)
            n_points += len(KEYS)
            if step % event_every == 0:
                seq += 1
                pending.append((run_id, attempt, src, {
                    "t": protocol.EVENT, "seq": seq, "time": t, "step": step,
                    "msg": f"step {step} done", "level": "info"}))
            if in_batch >= batch:
                with store.transaction():
                    store.apply(pending)
                store.bound_wal()  # what the daemon does after a commit
                wal_peak = max(wal_peak, wal_size(db))
                pending, in_batch = [], 0
        seq += 1
        pending.append((run_id, attempt, src, {
            "t": protocol.STATUS, "seq": seq, "time": t,
            "status": "finished" if attempt == len(ends) else "failed",
            "exit_code": 0 if attempt == len(ends) else 1}))
        with store.transaction():
            store.ensure_run(run_id, attempt)
            store.apply(pending)
        store.bound_wal()
        wal_peak = max(wal_peak, wal_size(db))
        start = max(0, end - back)
    took = time.perf_counter() - t0
    store.close()
    return {"run": run_id, "points": n_points, "s": took, "rate": n_points / took,
            "wal_peak": wal_peak}


CLIENT_SCRIPT = """
import sys, time
import ckptd_client as ckptd
steps, every = int(sys.argv[1]), int(sys.argv[2])
run = ckptd.init(name="scale-client")
t0 = time.perf_counter()
for step in range(steps):
    run.log({"loss": 1.0 / (step + 1), "lr": 1e-3, "grad_norm": 0.5 + step % 7,
             "tokens_per_s": 1e5 + step % 13}, step=step)
    if step % every == 0:
        run.event(f"step {step} done")
run.finish(timeout=600)
print(time.perf_counter() - t0, run.id)
"""


def client(home: Path, points: int, event_every: int) -> dict[str, Any]:
    """Points through the real client and daemon (the daemon is started and stopped here)."""
    script = home / "scale_client.py"
    script.write_text(textwrap.dedent(CLIENT_SCRIPT))
    log = open(home / "daemon.log", "ab")  # noqa: SIM115 - owned by the child
    daemon = subprocess.Popen([sys.executable, "-m", "ckptd.daemon", "--home", os.fspath(home)],
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                              env=daemon_env(home), start_new_session=True, cwd=home)
    log.close()
    try:
        time.sleep(1.0)
        steps = points // len(KEYS)
        proc = subprocess.Popen([sys.executable, os.fspath(script), str(steps),
                                 str(event_every)], stdout=subprocess.PIPE, text=True,
                                env=daemon_env(home), cwd=home)
        wal_peak = 0
        while proc.poll() is None:  # the WAL as the daemon keeps it, sampled
            wal_peak = max(wal_peak, wal_size(home / "ckptd.db"))
            time.sleep(0.05)
        assert proc.stdout is not None and proc.returncode == 0, proc.returncode
        took, run_id = proc.stdout.read().split()
        return {"run": run_id, "points": steps * len(KEYS), "s": float(took),
                "rate": steps * len(KEYS) / float(took), "wal_peak": wal_peak}
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=2_000_000, help="bulk store size (points)")
    ap.add_argument("--client-points", type=int, default=100_000,
                    help="points through the real client first (0: none)")
    ap.add_argument("--event-every", type=int, default=5, help="a log line every N steps")
    ap.add_argument("--batch", type=int, default=20_000, help="bulk points per transaction")
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--export-key", default=None,
                    help="export only this key (all keys take ~1 min per 2 M points here)")
    ap.add_argument("--reuse", action="store_true", help="measure the store in --home as is")
    args = ap.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="ckptd-scale-", dir="/var/tmp"))
    home.mkdir(parents=True, exist_ok=True)
    db = home / "ckptd.db"
    print(f"home {home}  load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    rows: list[tuple[str, str]] = []
    if not args.reuse:
        if args.client_points:
            c = client(home, args.client_points, args.event_every)
            rows.append(("insert rate, real client+daemon",
                         f"{c['rate']:,.0f} points/s ({c['points']:,} points, {c['s']:.1f} s)"))
            rows.append(("WAL peak while the daemon ingests (sampled every 50 ms)",
                         f"{c['wal_peak'] / 2**20:.1f} MiB"))
        b = bulk(home, args.points, args.batch, args.event_every)
        rows.append(("insert rate, bulk (Store.apply, no socket)",
                     f"{b['rate']:,.0f} points/s ({b['points']:,} points, {b['s']:.1f} s)"))
        rows.append(("WAL peak during bulk (after each commit)",
                     f"{b['wal_peak'] / 2**20:.1f} MiB"))
    run = "scale-bulk"
    export = f"--key {args.export_key}" if args.export_key else ""
    size, points, events = metric_bytes(db)
    rows.append(("store file", f"{db.stat().st_size / 2**20:,.0f} MiB, {points:,} points, "
                               f"{events:,} events"))
    rows.append(("metric tables+indexes per point", f"{size / max(points, 1):.1f} bytes"))
    rows.append(("whole file per point", f"{db.stat().st_size / max(points, 1):.1f} bytes"))
    for label, argv, first in (
            ("ckptd --version (interpreter + CLI start-up)", ("--version",), False),
            ("tail -n 100", ("tail", run, "-n", "100"), False),
            ("tail -n 100 --metrics", ("tail", run, "-n", "100", "--metrics"), False),
            ("metrics --key loss --format csv | head -1",
             ("metrics", run, "--key", "loss", "--format", "csv"), True),
            (f"metrics {export} --format csv (full export, to a pipe)",
             ("metrics", run, *export.split(), "--format", "csv"), False),
            ("ls", ("ls",), False),
            ("show", ("show", run), False)):
        m = measure(home, *argv, first_line=first)
        bad = f"  rc {m['rc']}{' TRACEBACK' if m['traceback'] else ''} {m['err']}" \
            if m["rc"] or m["traceback"] else ""
        rows.append((label, f"{m['s']:.2f} s, {m['rss_mb']:.0f} MB RSS, "
                            f"{m['lines']:,} lines{bad}"))
    rows.append(("WAL now (no daemon)", f"{wal_size(db) / 2**20:.1f} MiB"))
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    if args.home is None and os.environ.get("KEEP") != "1":
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
