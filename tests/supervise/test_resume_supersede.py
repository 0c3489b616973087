"""A resume on a large store does not stall the other runs (issue 8.15).

Marking the replaced timeline row by row (``UPDATE ... SET superseded = 1``)
took 24.9 s on a 20.7 M-point store, in the writer's transaction: every other
run's ``flush()`` waited, and the WAL grew to 1.18 GB. The resume now records
its restored step once and readers filter (``store.effective``).

Scaled down for CI: 2 M metric rows (20,000 steps x 100 keys), of which a
resume from step 1000 supersedes 95%.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ckptd_client import paths, protocol
from helpers import DaemonProc, ckptd, db_rows, env_for, spawn_script, wait_for

from ckptd.store.writer import Store

RUN = "20260101-000000-000002"
STEPS, KEYS, RESTORED_AT = 20_000, 100, 1000
#: Largest flush() latency of another run allowed while the resume registers.
#: Generous for a shared CI box; the old code held the writer for seconds.
FLUSH_BOUND = 0.5

#: Logs and flushes until told to stop, printing its slowest flush().
PROBE = """
import os, time
import ckptd_client as ckptd
run = ckptd.init(name="probe")
worst, step = 0.0, 0
while not os.path.exists(os.environ["STOP_FILE"]):
    run.log({"x": float(step)}, step=step)
    t0 = time.monotonic()
    run.flush(timeout=120)
    worst = max(worst, time.monotonic() - t0)
    step += 1
    time.sleep(0.01)
run.finish(timeout=120)
print("worst", worst, "flushes", step, flush=True)
"""


def build_store(home: Path) -> None:
    """Attempt 1 of RUN logged STEPS steps of KEYS metrics (the real insert path)."""
    store = Store(paths.db_path(home))
    try:
        with store.transaction():
            store.ensure_run(RUN, 1)
            store.apply((RUN, 1, "c", {"t": protocol.LOG, "seq": s + 1, "step": s,
                                       "time": 1.8e9 + s,
                                       "m": {f"k{k}": s + k / 100 for k in range(KEYS)}})
                        for s in range(STEPS))
    finally:
        store.close()


def send_restored(home: Path, step: int) -> float:
    """Attempt 2 of RUN says it resumed after checkpoint ``step``; returns the
    seconds until the daemon confirmed the commit."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.fspath(paths.socket_path(home)))
    s.settimeout(300)
    t0 = time.monotonic()
    s.sendall(protocol.encode({"t": protocol.HELLO, "run": RUN, "attempt": 2, "src": "c"}))
    s.sendall(protocol.encode({"t": protocol.RESTORED, "seq": 1, "time": time.time(),
                               "step": step}))
    s.sendall(protocol.encode({"t": protocol.FLUSH, "seq": 1}))
    reader = protocol.FrameReader()
    while True:
        data = s.recv(65536)
        assert data, "daemon closed the connection"
        if any(m["t"] == protocol.FLUSHED for m in reader.feed(data)):
            s.close()
            return time.monotonic() - t0


def test_resume_on_a_large_store_does_not_stall_other_runs(home: Path) -> None:
    t0 = time.monotonic()
    build_store(home)
    print(f"built {STEPS * KEYS} metric rows in {time.monotonic() - t0:.1f} s")
    d = DaemonProc(home)
    d.start()
    try:
        before = ckptd(home, "metrics", RUN, "--key", "k0", "--format", "jsonl", check=True)
        assert len(before.stdout.splitlines()) == STEPS
        stop = home.parent / "stop-probe"
        probe = spawn_script(home, PROBE, env=env_for(home, CKPTD_NO_AUTOSTART="1",
                                                      STOP_FILE=os.fspath(stop)))
        try:
            wait_for(lambda: db_rows(home, "SELECT 1 FROM runs WHERE name = 'probe'"),
                     what="probe running")
            time.sleep(1.0)  # a few flushes before the resume
            took = send_restored(home, RESTORED_AT)
            time.sleep(0.5)
        finally:
            stop.touch()
            out, err = probe.communicate(timeout=120)
        assert probe.returncode == 0, err
        worst = float(out.split()[1])
        print(f"resume committed in {took:.2f} s; probe's slowest flush {worst:.3f} s "
              f"({out.split()[3]} flushes)")
        after = ckptd(home, "metrics", RUN, "--key", "k0", "--format", "jsonl", check=True)
        rows = [json.loads(line) for line in after.stdout.splitlines()]
        # the effective timeline: attempt 1 up to the restored step, nothing after
        assert [(r["step"], r["attempt"], r["value"]) for r in rows] == \
            [(s, 1, float(s)) for s in range(RESTORED_AT + 1)]
        everything = ckptd(home, "metrics", RUN, "--key", "k0", "--all-attempts",
                           "--format", "jsonl", check=True)
        hidden = [json.loads(line) for line in everything.stdout.splitlines()]
        assert len(hidden) == STEPS
        assert {r["superseded"] for r in hidden if r["step"] > RESTORED_AT} == {1}
        assert worst < FLUSH_BOUND, worst
    finally:
        d.stop()
