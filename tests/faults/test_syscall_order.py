"""The durability protocols, read off the daemon's real system calls (as ALICE, OSDI'14, does).

Crash-point and power-cut tests cannot see a missing directory fsync on ext4:
the next fsync anywhere (SQLite's commit always does one) commits all pending
metadata, so the rename survives anyway. Other filesystems give no such
favour. These tests run the daemon under ``strace -f -y`` through a real
checkpoint commit and real event group commits, and assert the order the
protocols promise:

* checkpoint: every ``tensors.bin`` write, then its fsync, before
  ``manifest.json`` is written; the manifest fsynced; the staging directory
  fsynced; the rename; the parent directory fsynced; then the row committed
  (a write of ``ckptd.db-wal`` and its fsync); then CKPT_DONE sent;
* events: every write of ``ckptd.db-wal`` fsynced before an ack is sent.

Skipped (with the reason) where strace or ptrace is unavailable; never in CI
(``CI=true``), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from ckptd_client import paths
from helpers import env_for, kill_home_daemon, run_script, socket_answers, wait_for

SYSCALLS = ("openat,write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync,sync_file_range,"
            "rename,renameat,renameat2,unlink,unlinkat,sendto,sendmsg")
WRITES = {"write", "pwrite64", "writev", "pwritev", "pwritev2"}
SYNCS = {"fsync", "fdatasync"}
SENDS = {"sendto", "sendmsg", "write", "writev"}
RENAMES = {"rename", "renameat", "renameat2"}


def strace_unavailable() -> str | None:
    """Why the daemon cannot be traced here, or None."""
    strace = shutil.which("strace") or ("/usr/bin/strace" if os.path.exists("/usr/bin/strace")
                                        else None)
    if strace is None:
        return "strace is not installed"
    probe = subprocess.run([strace, "-f", "-qq", "-o", os.devnull, "true"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"strace cannot trace here (ptrace refused?): {probe.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="module")
def strace() -> str:
    reason = strace_unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the system-call order tests: {reason}")
        pytest.skip(reason)
    return shutil.which("strace") or "/usr/bin/strace"


@dataclass
class Call:
    """One system call: ``start``/``end`` are trace line numbers (a call split
    into ``<unfinished ...>`` and ``<... resumed>`` spans both)."""

    start: int
    end: int
    tid: int
    name: str
    args: str
    ret: int

    @property
    def fd_path(self) -> str:
        """The path strace -y printed for the first argument (a file descriptor)."""
        m = re.match(r"-?\d+<(.*?)>(?:,|$)", self.args)
        return m.group(1) if m else ""

    @property
    def strings(self) -> list[str]:
        return re.findall(r'"((?:[^"\\]|\\.)*)"', self.args)


_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+|\?)")
_UNFINISHED = re.compile(r"^(\d+)\s+(\w+)\((.*?)\s*<unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(-?\d+|\?)")


def parse_trace(text: str) -> list[Call]:
    """Completed calls in start order."""
    calls: list[Call] = []
    pending: dict[int, tuple[int, str, str]] = {}
    for i, line in enumerate(text.splitlines()):
        if m := _LINE.match(line):
            ret = int(m.group(4)) if m.group(4) != "?" else -1
            calls.append(Call(i, i, int(m.group(1)), m.group(2), m.group(3), ret))
        elif m := _UNFINISHED.match(line):
            pending[int(m.group(1))] = (i, m.group(2), m.group(3))
        elif (m := _RESUMED.match(line)) and int(m.group(1)) in pending:
            start, name, args = pending.pop(int(m.group(1)))
            ret = int(m.group(4)) if m.group(4) != "?" else -1
            calls.append(Call(start, i, int(m.group(1)), name, args + m.group(3), ret))
    calls.sort(key=lambda c: c.start)
    return calls


def traced_session(strace: str, home: Path, tmp_path: Path, script: str) -> list[Call]:
    """Start the daemon under strace, run ``script`` as the trainer, stop the
    daemon, return its system calls."""
    out = tmp_path / "daemon.strace"
    log = open(home / "daemon.log", "ab")  # noqa: SIM115 - owned by the child
    tracer = subprocess.Popen(
        [strace, "-f", "-y", "-qq", "-s", "96", "-o", os.fspath(out), "-e",
         f"trace={SYSCALLS}", sys.executable, "-m", "ckptd.daemon", "--home", os.fspath(home)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env_for(home),
        start_new_session=True)
    log.close()
    try:
        wait_for(lambda: socket_answers(home), timeout=60, what="traced daemon socket")
        run_script(home, script, timeout=180)
    finally:
        kill_home_daemon(home)  # the daemon's own pid (from its lock), not strace's
        try:
            tracer.wait(timeout=60)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    return parse_trace(out.read_text(errors="replace"))


def _first(calls: list[Call], what: str, pred: object) -> Call:
    found = [c for c in calls if pred(c)]  # type: ignore[operator]
    assert found, f"the daemon never did: {what}"
    return found[0]


def _is_wal(c: Call) -> bool:
    return c.fd_path.endswith("/ckptd.db-wal")


def _ok(c: Call) -> bool:
    return c.ret >= 0


CKPT_TRAINER = """
import ckptd_client as ckptd, torch
run = ckptd.init(name="traced")
# nothing else is logged while the checkpoint commits: the first WAL write
# after the rename is the checkpoint's row
run.checkpoint({"w": torch.full((256, 256), 1.0)}, step=1).wait(timeout=120)
run.finish(timeout=60)
"""


def test_checkpoint_commit_syscall_order(strace: str, home: Path, tmp_path: Path) -> None:
    """data fsync < manifest write; manifest fsync < staging dir fsync < rename <
    parent dir fsync < row (WAL write + fsync) < CKPT_DONE."""
    calls = traced_session(strace, home, tmp_path, CKPT_TRAINER)
    runs = os.listdir(home / paths.RUNS_DIR)
    assert len(runs) == 1, runs
    root = os.fspath(paths.checkpoints_dir(home, runs[0]).resolve())
    staging, final = f"{root}/step-1.ckptd-tmp", f"{root}/step-1"
    data, manifest = f"{staging}/tensors.bin", f"{staging}/manifest.json"

    data_writes = [c for c in calls if c.name in WRITES and c.fd_path == data and _ok(c)]
    assert data_writes, "the daemon never wrote tensors.bin"
    manifest_write = _first(calls, "write manifest.json",
                            lambda c: c.name in WRITES and c.fd_path == manifest)
    rename = _first(calls, f"rename {staging} -> {final}",
                    lambda c: c.name in RENAMES and _ok(c)
                    and [s for s in c.strings if s.startswith("/")] == [staging, final])
    reply = _first(calls, "send CKPT_DONE",
                   lambda c: c.name in SENDS and c.fd_path.startswith("socket:")
                   and "ckpt_done" in c.args)

    def synced(path: str, after: int, before: int) -> bool:
        """An fsync of ``path`` began after line ``after`` and returned before ``before``."""
        return any(c.name in SYNCS and c.fd_path == path and _ok(c)
                   and c.start > after and c.end < before for c in calls)

    last_data = max(c.end for c in data_writes)
    assert synced(data, last_data, manifest_write.start), \
        "tensors.bin was not fsynced between its last write and the manifest's first write"
    manifest_writes = [c for c in calls if c.name in WRITES and c.fd_path == manifest]
    staging_syncs = [c for c in calls if c.name in SYNCS and c.fd_path == staging and _ok(c)
                     and c.end < rename.start]
    assert staging_syncs, "the staging directory was not fsynced before the rename"
    assert synced(manifest, max(c.end for c in manifest_writes), staging_syncs[-1].start), \
        "manifest.json was not fsynced between its last write and the staging directory fsync"
    assert staging_syncs[-1].start > max(last_data, manifest_writes[-1].end), \
        "the staging directory fsync came before the files were written"
    row_write = _first(calls, "write the row to ckptd.db-wal after the rename",
                       lambda c: c.name in WRITES and _is_wal(c) and c.start > rename.end)
    assert synced(root, rename.end, row_write.start), \
        "the parent directory was not fsynced after the rename and before the row was written"
    assert row_write.start < reply.start, "CKPT_DONE was sent before the row was written"
    assert synced(paths_wal(home), row_write.end, reply.start), \
        "the row's WAL write was not fsynced before CKPT_DONE was sent"


def paths_wal(home: Path) -> str:
    return os.fspath((home / "ckptd.db-wal").resolve())


EVENTS_TRAINER = """
import ckptd_client as ckptd
run = ckptd.init(name="traced-events")
for step in range(300):
    run.log({"x": float(step)}, step=step)
    if step % 100 == 99:
        run.flush(timeout=60)
run.finish(timeout=60)
"""


def test_event_group_commit_fsyncs_before_ack(strace: str, home: Path, tmp_path: Path) -> None:
    """Every ack follows an fsync of ckptd.db-wal that came after the WAL's last write."""
    calls = traced_session(strace, home, tmp_path, EVENTS_TRAINER)
    wal = paths_wal(home)
    acks = [c for c in calls if c.name in SENDS and c.fd_path.startswith("socket:")
            and '\\"t\\":\\"ack\\"' in c.args]
    assert acks, "the daemon never sent an ack"
    wal_writes = [c for c in calls if c.name in WRITES and c.fd_path == wal]
    wal_syncs = [c for c in calls if c.name in SYNCS and c.fd_path == wal and _ok(c)]
    for ack in acks:
        before = [w for w in wal_writes if w.start < ack.start]
        assert before, f"ack at trace line {ack.start} came before any WAL write"
        last = max(w.end for w in before)
        assert any(s.start > last and s.end < ack.start for s in wal_syncs), \
            f"ack at trace line {ack.start} was sent before the WAL write at line {last} " \
            "was fsynced"
