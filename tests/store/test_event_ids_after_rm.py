"""``ckptd tail -f`` of one run shows each of its lines exactly once, in order,
also after ``ckptd rm`` removed another run whose events had the newest ids.

A follower continues after the highest event id it has seen (``tail -n N``
starts from the newest id in the store, any run's). Were ids handed out again
(a plain rowid is ``max(rowid) + 1``, so deleting the newest rows frees their
ids), the followed run's next lines would get ids at or below that cursor and
``tail -f`` would skip them. Schema 10 gives events an ``AUTOINCREMENT`` id.

Metric series ids are reused the same way (``metric_series.id``), and that is
safe: a follower's metric cursor holds the followed run's own series ids only,
read again at every look, so a new series with a freed id is a series it has
not seen, shown from its first point. The test makes that happen and checks it.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import sqlite_utils
from helpers import DaemonProc, ckptd, db_rows, env_for, run_script, spawn_script, wait_for

from ckptd.store.writer import MIGRATIONS, Store

#: Run B: five lines, then (once told) 60 more, then it finishes. Each line
#: comes with a metric; from line 5 on also a new one, ``y`` (a new series).
FOLLOWED = """
import os, time
import ckptd_client as ckptd

run = ckptd.init(name="b", autostart=False)
for i in range(5):
    run.event(f"b-line {i}")
    run.log({"x": i}, step=i)
run.flush()
print(run.id, flush=True)
go = os.path.join(os.environ["SYNC_DIR"], "go")
while not os.path.exists(go):
    time.sleep(0.02)
for i in range(5, 65):
    run.event(f"b-line {i}")
    run.log({"x": i, "y": i}, step=i)
run.finish(timeout=60)
"""

#: Run A: logged after B's first lines, so its events hold the newest ids.
REMOVED = """
import ckptd_client as ckptd

run = ckptd.init(name="a", autostart=False)
for i in range(40):
    run.event(f"a-line {i}")
    run.log({"a": i}, step=i)
print(run.id, flush=True)
run.finish(timeout=60)
"""

LINE = re.compile(r"\b([ab])-line (\d+)\b")
POINT = re.compile(r" step (\d+)  (.*)$")


def test_tail_f_shows_every_line_once_after_rm_of_the_run_with_the_newest_ids(
        home: Path) -> None:
    sync = home.parent / "sync"
    sync.mkdir()
    # no system metrics: no series of the daemon's takes a freed id before ``y``
    daemon = DaemonProc(home, env=env_for(home, CKPTD_SYS_INTERVAL="3600"))
    daemon.start()
    followed = spawn_script(home, FOLLOWED, env=env_for(home, SYNC_DIR=os.fspath(sync)))
    tail: subprocess.Popen[str] | None = None
    try:
        assert followed.stdout is not None
        b = followed.stdout.readline().strip()
        assert b, followed.stderr.read() if followed.stderr else ""
        a = run_script(home, REMOVED).stdout.split()[-1]
        top_a = db_rows(home, "SELECT MAX(rowid) FROM events WHERE run_id = ?", (a,))[0][0]
        top_b = db_rows(home, "SELECT MAX(rowid) FROM events WHERE run_id = ?", (b,))[0][0]
        assert top_a > top_b + 40, (top_a, top_b)  # A's rows are the newest ones
        sids_a = {sid for (sid,) in db_rows(home, "SELECT id FROM metric_series WHERE"
                                            " run_id = ?", (a,))}
        assert max(sids_a) == db_rows(home, "SELECT MAX(id) FROM metric_series")[0][0]
        tail = subprocess.Popen(
            [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "tail", "-f", "-n", "100",
             "--metrics", b], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env_for(home), stdin=subprocess.DEVNULL)
        seen: list[tuple[str, int]] = []
        points: list[tuple[str, int]] = []

        def read() -> None:
            assert tail is not None and tail.stdout is not None
            for line in tail.stdout:
                m = LINE.search(line)
                if m:
                    seen.append((m.group(1), int(m.group(2))))
                m = POINT.search(line)
                if m:
                    for key, value in re.findall(r"(\w+)=(\S+)", m.group(2)):
                        assert float(value) == int(m.group(1)), line
                        points.append((key, int(m.group(1))))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: ("b", 4) in seen, what="B's first lines in tail -f")
        ckptd(home, "rm", "--yes", a, check=True)
        assert db_rows(home, "SELECT COUNT(*) FROM events WHERE run_id = ?", (a,)) == [(0,)]
        (sync / "go").touch()
        _, err = followed.communicate(timeout=90)
        assert followed.returncode == 0, err
        # B finished: tail -f prints what is left and exits
        tail.wait(timeout=30)
        reader.join(timeout=10)
        assert tail.returncode == 0, tail.stderr.read() if tail.stderr else ""
        new_ids = db_rows(home, "SELECT MIN(rowid) FROM events WHERE run_id = ? AND"
                          " message = 'b-line 5'", (b,))[0][0]
        [(sid_y,)] = db_rows(home, "SELECT id FROM metric_series WHERE run_id = ? AND"
                             " key = 'y'", (b,))
    finally:
        (sync / "go").touch()
        for proc in (followed, tail):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
        daemon.stop()
    got = [i for who, i in seen if who == "b"]
    print(f"A's newest event id {top_a}; B's line 5 got id {new_ids}; tail -f printed "
          f"B's lines {got[:3]}...{got[-3:]} ({len(got)} of 65)")
    assert [who for who, _ in seen] == ["b"] * len(seen)
    assert got == list(range(65)), got
    assert new_ids > top_a  # an id is never handed out twice
    # B's new series took one of A's freed ids; each of its points shown once
    assert sid_y in sids_a, (sid_y, sids_a)
    assert sorted(i for k, i in points if k == "y") == list(range(5, 65)), points
    assert sorted(i for k, i in points if k == "x") == list(range(65)), points
    assert {k for k, _ in points} == {"x", "y"}


def test_schema_9_events_keep_their_ids_and_freed_ids_stay_unused(tmp_path: Path) -> None:
    """The migration to schema 10 copies the events with their ids (a follower's
    cursor stays valid), and afterwards the ids of removed rows are not reused."""
    conn = sqlite3.connect(tmp_path / "ckptd.db", isolation_level=None)
    db = sqlite_utils.Database(conn)
    for version in range(1, 10):
        MIGRATIONS[version](db)
    conn.execute("PRAGMA user_version = 9")
    conn.executemany(
        "INSERT INTO events (run_id, attempt, src, seq, time, kind, level, message, rank)"
        " VALUES (?, 1, 'c-aa', ?, ?, 'event', 'info', ?, 0)",
        [(run, seq, 1.7e9 + seq, f"{run} {seq}") for run in ("b", "a") for seq in (1, 2, 3)])
    conn.executemany("INSERT INTO runs (id, name, status, attempt, started) VALUES"
                     " (?, ?, 'finished', 1, 1.7e9)", [("a", "a"), ("b", "b")])
    before = conn.execute("SELECT rowid, run_id, seq, message FROM events").fetchall()
    conn.close()
    store = Store(tmp_path / "ckptd.db")
    try:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == 10
        assert store.conn.execute(
            "SELECT id, run_id, seq, message FROM events ORDER BY id").fetchall() == before
        assert store.conn.execute("SELECT COUNT(*) FROM effective_events").fetchone() == (6,)
        top = max(r[0] for r in before)
        with store.transaction():
            store.remove_run("a")  # the newest ids
            store.record_event("b", 1, "after rm")
        [(new,)] = store.conn.execute("SELECT id FROM events WHERE message = 'after rm'")
        assert new > top, (new, top)
    finally:
        store.close()
