"""Every writer process of a run has its own identity in the dedup key.

Two processes joining one attempt (``ckptd run -- bash -c 'a & b'``), forked
children (``os.fork``, DataLoader workers with fork) and spawned workers that
call ``init()`` at module level all used to number their events from 1 under
the same ``(run, attempt, src)``: ``INSERT OR IGNORE`` kept one copy and
silently dropped the other. Real daemon, real processes, real torch DataLoader.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
from ckptd_client import paths, protocol
from helpers import DaemonProc, ckptd, db_rows, run_script, wait_for

WRITER = """
import sys
import ckptd_client as ckptd
who = int(sys.argv[1])
run = ckptd.init()
for step in range(1000):
    run.log({"x": who * 10000 + step}, step=step)
for i in range(20):
    run.event(f"writer {who} event {i}")
run.flush()
run.finish()
"""


def test_two_processes_of_one_run_keep_all_rows(home: Path, daemon: DaemonProc) -> None:
    script = home.parent / "writer.py"
    script.write_text(WRITER)
    cmd = f"{sys.executable} {script} 0 & {sys.executable} {script} 1 & wait"
    ckptd(home, "run", "--name", "two", "--", "bash", "-c", cmd, check=True, timeout=120)
    (run_id,) = db_rows(home, "SELECT id FROM runs WHERE name = 'two'")[0]
    values = [v for (v,) in db_rows(home, "SELECT value FROM metrics WHERE run_id = ?"
                                    " AND key = 'x'", (run_id,))]
    assert sorted(values) == sorted(w * 10000 + s for w in (0, 1) for s in range(1000))
    events = db_rows(home, "SELECT message FROM events WHERE run_id = ? AND message LIKE"
                     " 'writer %'", (run_id,))
    assert len(events) == 40
    assert db_rows(home, "SELECT status FROM runs WHERE id = ?", (run_id,)) == [("finished",)]


def _hello(home: Path, run_id: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.fspath(paths.socket_path(home)))
    s.sendall(protocol.encode({"t": protocol.HELLO, "run": run_id, "attempt": 1, "src": "c"}))
    return s


def _flush(s: socket.socket, seq: int) -> None:
    s.sendall(protocol.encode({"t": protocol.FLUSH, "seq": seq}))
    reader = protocol.FrameReader()
    s.settimeout(15)
    while True:
        data = s.recv(65536)
        assert data, "the daemon closed the connection"
        if any(m["t"] == protocol.FLUSHED for m in reader.feed(data)):
            return


def test_duplicate_key_with_other_content_is_reported(home: Path, daemon: DaemonProc) -> None:
    """An old client (plain ``src`` ``c``) in two processes: the second copy is
    not a replay; it is reported in the daemon log and as an error event."""
    ev = {"t": protocol.LOG, "seq": 1, "step": 0, "time": 1.7e9, "m": {"x": 1.0}}
    a, b = _hello(home, "dup"), _hello(home, "dup")
    a.sendall(protocol.encode(ev))
    _flush(a, 1)
    b.sendall(protocol.encode(ev))  # a replay: identical, idempotent, no report
    _flush(b, 1)
    assert db_rows(home, "SELECT COUNT(*) FROM events WHERE run_id = 'dup'"
                   " AND level = 'error'") == [(0,)]
    b.sendall(protocol.encode({**ev, "m": {"x": 2.0}}))  # same key, other value
    _flush(b, 1)
    a.close()
    b.close()
    assert db_rows(home, "SELECT value FROM metrics WHERE run_id = 'dup'") == [(1.0,)]
    errors = db_rows(home, "SELECT message FROM events WHERE run_id = 'dup'"
                     " AND level = 'error'")
    assert len(errors) == 1 and "reused a sequence number" in errors[0][0]
    assert "reused a sequence number" in (home / "daemon.log").read_text()


FORK = """
import os
import ckptd_client as ckptd
run = ckptd.init(name="forked")
run.log({"parent": 0.0}, step=0)
pids = []
for child in range(2):
    pid = os.fork()
    if pid == 0:
        for step in range(100):
            run.log({"child": child * 1000 + step}, step=step)
        run.event(f"child {child} done")
        os._exit(0) if child == 0 else None  # child 1 leaves through atexit
        raise SystemExit(0)
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
for step in range(1, 100):
    run.log({"parent": float(step)}, step=step)
run.event("parent done")
"""


def test_os_fork_child_logs_as_its_own_writer(home: Path, daemon: DaemonProc) -> None:
    t0 = time.monotonic()
    run_script(home, FORK, timeout=120)
    elapsed = time.monotonic() - t0
    (run_id,) = db_rows(home, "SELECT id FROM runs WHERE name = 'forked'")[0]
    assert db_rows(home, "SELECT status FROM runs WHERE id = ?", (run_id,)) == [("finished",)]
    parent = db_rows(home, "SELECT COUNT(*) FROM metrics WHERE run_id = ? AND key = 'parent'",
                     (run_id,))
    assert parent == [(100,)]
    # child 0 left with os._exit: what log() acknowledged is still delivered
    wait_for(lambda: db_rows(home, "SELECT COUNT(*) FROM metrics WHERE run_id = ?"
                             " AND key = 'child'", (run_id,)) == [(200,)],
             what="both children's rows")
    msgs = {m for (m,) in db_rows(home, "SELECT message FROM events WHERE run_id = ?",
                                  (run_id,))}
    assert {"child 0 done", "child 1 done", "parent done"} <= msgs
    srcs = db_rows(home, "SELECT COUNT(DISTINCT src) FROM metrics WHERE run_id = ?", (run_id,))
    assert srcs == [(3,)]
    assert elapsed < 10, f"a forked child waited at exit on replies meant for its parent " \
                         f"({elapsed:.1f} s)"


DATALOADER = """
import sys
import torch
from torch.utils.data import DataLoader, Dataset
import ckptd_client as ckptd

# module level on purpose: spawn workers import this module and run it too
run = ckptd.init(name="dl")


class Items(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        run.log({"item": float(i)})
        return torch.tensor([float(i)])


if __name__ == "__main__":
    assert not getattr(ckptd, "is_worker", bool)()  # (bool: a client without it)
    loader = DataLoader(Items(), batch_size=8, num_workers=2,
                        multiprocessing_context=sys.argv[1])
    for epoch in range(3):
        for batch in loader:
            pass
        run.event(f"epoch {epoch} done")
    run.finish()
"""


@pytest.mark.parametrize("context,supervised", [("fork", False), ("spawn", False),
                                                 ("spawn", True)])
def test_dataloader_workers_log_into_the_run(home: Path, daemon: DaemonProc, context: str,
                                             supervised: bool) -> None:
    pytest.importorskip("torch")
    script = home.parent / "dl.py"
    script.write_text(DATALOADER)
    if supervised:
        ckptd(home, "run", "--", sys.executable, os.fspath(script), context, check=True,
              timeout=240)
    else:
        run_script(home, DATALOADER, args=[context], timeout=240)
    runs = db_rows(home, "SELECT id, status FROM runs ORDER BY started")
    run_id = runs[0][0]
    rows = db_rows(home, "SELECT value FROM metrics WHERE run_id = ? AND key = 'item'",
                   (run_id,))
    print(f"{context} supervised={supervised}: {len(rows)} of 192 values stored; runs {runs}")
    assert len(runs) == 1, f"workers made runs of their own: {runs}"
    assert runs[0][1] == "finished"
    assert sorted(v for (v,) in rows) == sorted(float(i) for i in range(64) for _ in range(3))
    msgs = {m for (m,) in db_rows(home, "SELECT message FROM events WHERE run_id = ?",
                                  (run_id,))}
    assert {"epoch 0 done", "epoch 1 done", "epoch 2 done"} <= msgs
