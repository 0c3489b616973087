"""The store's disk fills up (SPEC promise 4, §6): clear errors, no corruption, and
logging resumes by itself once space is freed.

The home lives on a small tmpfs; the test fills it with a filler file while a
real trainer logs through a real daemon, then deletes the filler. (Checkpoints
on a full disk are covered with the checkpoint tests; here it is the SQLite
store and the client spool that run out of space.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ckptd_client import paths
from helpers import DaemonProc, ckptd, db_rows, env_for, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

TRAINER = """
import os, sys, time
import ckptd_client as ckptd
from ckptd_client.errors import CkptdError

ctl = sys.argv[1]
def say(text):
    with open(os.path.join(ctl, "progress"), "a") as f:
        f.write(text + "\\n")
def wait(name):
    while not os.path.exists(os.path.join(ctl, name)):
        time.sleep(0.02)

run = ckptd.init(name="diskfull")
say("run " + run.id)
for step in range(200):
    run.log({"x": float(step), "pad": step * 0.5}, step=step)
run.flush(timeout=30)
say("phase1 flushed")
wait("full")
t = time.monotonic()
for step in range(200, 3200):
    run.log({"x": float(step), "pad": step * 0.5}, step=step)
    if step % 4 == 0:  # a few MiB in all: more than the WAL's reusable space
        run.event("logged on a full disk " + "y" * 2000, step=step)
say("phase2 logged %.3f" % (time.monotonic() - t))
try:
    run.flush(timeout=5)
    say("phase2 flush returned")
except CkptdError as exc:
    say("phase2 flush raised: " + str(exc).replace("\\n", " "))
wait("freed")
run.flush(timeout=120)
say("phase3 flushed")
run.finish(timeout=60)
say("done")
"""


@contextlib.contextmanager
def small_fs(where: Path, size: str = "8m") -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    os.fspath(where)], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", os.fspath(where)], capture_output=True)


def fill(fs: Path) -> Path:
    """Write a filler file until the filesystem has no space left."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 64 << 10, 4096, 512):  # big chunks, then the last crumbs
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


def progress(ctl: Path) -> list[str]:
    try:
        return (ctl / "progress").read_text().splitlines()
    except FileNotFoundError:
        return []


def test_store_disk_full_then_freed(tmp_path: Path) -> None:
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    with small_fs(tmp_path / "small") as fs:
        home = fs / "home"
        home.mkdir(mode=0o700)
        env = env_for(home)
        daemon = DaemonProc(home, env=env)
        trainer = None
        script = tmp_path / "trainer.py"
        script.write_text(TRAINER)
        try:
            daemon.start()
            trainer = subprocess.Popen([sys.executable, os.fspath(script), os.fspath(ctl)],
                                       env=env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True)
            wait_for(lambda: "phase1 flushed" in progress(ctl) or trainer.poll() is not None,
                     timeout=60, what="phase 1")
            run_id = progress(ctl)[0].split()[1]
            filler = fill(fs)
            (ctl / "full").touch()
            wait_for(lambda: any(p.startswith("phase2 flush") for p in progress(ctl))
                     or trainer.poll() is not None, timeout=120, what="phase 2")
            assert trainer.poll() is None, trainer.communicate()[1]
            # the daemon survived the full disk and the store is intact
            assert daemon.proc is not None and daemon.proc.poll() is None
            conn = sqlite3.connect(f"file:{home / 'ckptd.db'}?mode=ro", uri=True, timeout=30)
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            conn.close()
            listing = ckptd(home, "ls", env=env)
            assert listing.returncode == 0 and run_id in listing.stdout, listing.stderr
            filler.unlink()
            (ctl / "freed").touch()
            _, stderr = trainer.communicate(timeout=180)
            assert trainer.returncode == 0, stderr
            lines = progress(ctl)
            assert "done" in lines, lines
            print("\n".join(lines))
            # clear errors, one line per kind of problem, no traceback
            assert "Traceback" not in stderr, stderr
            assert "disk is full" in stderr or "No space left" in stderr, stderr
            # logging resumed: every step exactly once, nothing left behind
            wait_for(lambda: not list(paths.spool_dir(home).glob("*.spool")), timeout=30,
                     what="spool drained")
            rows = db_rows(home, "SELECT COUNT(*), COUNT(DISTINCT step), MAX(step) FROM metrics"
                           " WHERE run_id = ? AND key = 'x'", (run_id,))
            assert rows == [(3200, 3200, 3199)], rows
            assert db_rows(home, "SELECT status FROM runs WHERE id = ?", (run_id,)) == \
                [("finished",)]
            conn = sqlite3.connect(f"file:{home / 'ckptd.db'}?mode=ro", uri=True, timeout=30)
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            conn.close()
        finally:
            (ctl / "full").touch()
            (ctl / "freed").touch()
            with contextlib.suppress(FileNotFoundError):
                (fs / "filler").unlink()
            if trainer is not None and trainer.poll() is None:
                trainer.kill()
                trainer.wait()
            daemon.stop()
