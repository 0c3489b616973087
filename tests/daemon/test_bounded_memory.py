"""The daemon's memory and WAL stay bounded whatever clients throw at it.

Issue 8.10: a 391 MB spool was parsed whole (3.6 GB of daemon RSS), outlived
the 120 s writer-call timeout and was then ingested a second time. Issue
8.12: 1 MiB messages for 30 s took the daemon to 1.7 GB and the WAL to 866 MB,
which never shrank until a restart: queues and batches were bounded in
events, not bytes.

Scaled down for CI (the numbers each test prints are the measurements):
a 40 MB spool, and 480 events of 1 MiB.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import psutil
from ckptd_client import paths, protocol
from ckptd_client.spool import SpoolWriter, encode_record
from helpers import DaemonProc, db_rows, env_for, run_script, wait_for

MB = 1 << 20


class PeakSampler:
    """Samples a process's RSS and the WAL's size every 20 ms, keeping the peaks."""

    def __init__(self, pid: int, home: Path) -> None:
        self.proc = psutil.Process(pid)
        self.wal = home / "ckptd.db-wal"
        self.rss = self.wal_size = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.rss = max(self.rss, self.proc.memory_info().rss)
            except psutil.Error:
                return
            try:
                self.wal_size = max(self.wal_size, os.stat(self.wal).st_size)
            except OSError:
                pass

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


#: Extra daemon RSS allowed while ingesting the spool. It is held a batch at a
#: time (4 MiB of records, ~10x that parsed); the old code held all of it.
SPOOL_RSS_EXTRA = 150 * MB
SPOOL_BYTES = 40 * MB
KEYS = 20


def write_spool(home: Path, run_id: str, size: int = SPOOL_BYTES) -> int:
    """A real client spool file of ``size`` bytes: what a fast trainer logs offline."""
    writer = SpoolWriter(paths.spool_dir(home), run_id, 1)
    tag = {"run": run_id, "a": 1, "src": "c"}
    seq = written = 0
    chunk: list[bytes] = []
    while written < size:
        seq += 1
        rec = encode_record(protocol.dumps(
            {"t": protocol.LOG, "seq": seq, "step": seq, "time": 1.8e9 + seq,
             "m": {f"metric_{k}": seq * 0.001 + k for k in range(KEYS)}, **tag}).encode())
        chunk.append(rec)
        written += len(rec)
        if len(chunk) == 1000:
            writer.append(b"".join(chunk))
            chunk = []
    writer.append(b"".join(chunk))
    writer.close()
    return seq


def test_large_spool_is_ingested_once_in_bounded_memory(home: Path) -> None:
    run_id = "20260101-000000-000001"
    n = write_spool(home, run_id)
    spool = paths.spool_dir(home)
    size = sum(p.stat().st_size for p in spool.iterdir())
    d = DaemonProc(home)
    d.start(wait=False)
    try:
        wait_for(lambda: psutil.pid_exists(d.pid), what="daemon process")
        baseline = 0
        with PeakSampler(d.pid, home) as peak:
            wait_for(lambda: (home / "daemon.log").exists() and "serving" in
                     (home / "daemon.log").read_text(), what="daemon up")
            baseline = psutil.Process(d.pid).memory_info().rss
            wait_for(lambda: not any(spool.glob("*.spool")), timeout=300,
                     what="spool ingested", interval=0.2)
        rows = db_rows(home, "SELECT COUNT(*), COUNT(DISTINCT seq) FROM metrics"
                       " WHERE run_id = ?", (run_id,))[0]
        assert rows == (n * KEYS, n), rows
        print(f"spool {size / MB:.0f} MB, {n} events: daemon RSS {baseline / MB:.0f} MB at "
              f"start, peak {peak.rss / MB:.0f} MB; WAL peak {peak.wal_size / MB:.0f} MB")
        assert peak.rss - baseline < SPOOL_RSS_EXTRA, (peak.rss, baseline)
        log = (home / "daemon.log").read_text()
        ingested = re.findall(r"ingested (\d+) events from (\S+)", log)
        assert len(ingested) == 1 and int(ingested[0][0]) == n, ingested
        assert db_rows(home, "SELECT COUNT(*) FROM spool_progress") == [(0,)]
    finally:
        d.stop()


#: Logs ``N`` events of 1 MiB as fast as it can, then flushes.
FLOOD = """
import sys, time
import ckptd_client as ckptd
n = int(sys.argv[1])
run = ckptd.init(name="flood")
print("run", run.id, flush=True)
text = "x" * ((1 << 20) - 256)
t0 = time.monotonic()
for i in range(n):
    run.event(text, i=i)
run.flush(timeout=600)
run.finish(timeout=600)
print("seconds", time.monotonic() - t0, flush=True)
"""
FLOOD_EVENTS = 480
#: Extra daemon RSS allowed: the byte budgets (64 MiB queued + a 16 MiB batch)
#: plus decoding buffers; without them the queue held the whole flood.
FLOOD_RSS_EXTRA = 200 * MB
#: The WAL may pass its 64 MiB limit by about one batch before it is truncated.
WAL_PEAK = 96 * MB


def test_flood_of_large_events_keeps_rss_and_wal_bounded(home: Path) -> None:
    d = DaemonProc(home)
    d.start()
    try:
        baseline = psutil.Process(d.pid).memory_info().rss
        with PeakSampler(d.pid, home) as peak:
            out = run_script(home, FLOOD, args=[str(FLOOD_EVENTS)], timeout=900,
                             env=env_for(home, CKPTD_NO_AUTOSTART="1")).stdout
        run_id = re.search(r"^run (\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
        count = db_rows(home, "SELECT COUNT(*) FROM events WHERE run_id = ? AND src GLOB 'c*'"
                        " AND kind = 'event' AND length(message) > 1000000", (run_id,))
        assert count == [(FLOOD_EVENTS,)], count
        print(f"flood {FLOOD_EVENTS} x 1 MiB ({float(out.split()[-1]):.1f} s): daemon RSS "
              f"{baseline / MB:.0f} MB at start, peak {peak.rss / MB:.0f} MB; WAL peak "
              f"{peak.wal_size / MB:.0f} MB")
        assert peak.rss - baseline < FLOOD_RSS_EXTRA, (peak.rss, baseline)
        assert peak.wal_size < WAL_PEAK, peak.wal_size
        # idle now: the WAL is truncated back under its limit, without a restart
        wait_for(lambda: os.stat(home / "ckptd.db-wal").st_size <= 64 * MB, timeout=30,
                 what="WAL truncated")
    finally:
        d.stop()


__all__ = ["time"]


def test_spool_ingestion_stopped_midway_resumes_where_it_committed(home: Path) -> None:
    """A clean stop in the middle of a large spool keeps what was committed and
    the next start continues from the recorded offset, not from the start."""
    run_id = "20260101-000000-000003"
    n = write_spool(home, run_id, 12 * MB)  # three batches
    d = DaemonProc(home)
    d.start(wait=False)
    try:
        wait_for(lambda: (home / "ckptd.db").exists() and db_rows(
            home, "SELECT 1 FROM sqlite_master WHERE name = 'spool_progress'") and db_rows(
            home, "SELECT offset FROM spool_progress WHERE offset > 0"), timeout=120,
            interval=0.05, what="a first batch committed")
        assert d.terminate(timeout=60) == 0
    finally:
        d.stop()
    log = (home / "daemon.log").read_text()
    assert re.search(r"ingested up to byte \d+; the rest at the next start", log), log
    d = DaemonProc(home)
    d.start()
    try:
        wait_for(lambda: not any(paths.spool_dir(home).glob("*.spool")), timeout=300,
                 interval=0.2, what="spool ingested")
        rows = db_rows(home, "SELECT COUNT(*), COUNT(DISTINCT seq) FROM metrics"
                       " WHERE run_id = ?", (run_id,))[0]
        assert rows == (n * KEYS, n), rows
        ingested = re.findall(r"ingested (\d+) events from",
                              (home / "daemon.log").read_text())
        assert len(ingested) == 1 and 0 < int(ingested[0]) < n, ingested
    finally:
        d.stop()
