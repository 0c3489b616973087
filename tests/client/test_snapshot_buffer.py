"""A checkpoint's snapshot buffer is private to its trainer and its daemon
(SPEC promise 6), and a hostile buffer name never kills training (promise 4).

Found: buffers were /dev/shm files with predictable names
(``ckptd-<uid>-<home hash>-<pid>-<run id>``) opened with O_CREAT but not
O_EXCL. A second user who pre-created that name (mode 0666) got root's
checkpointed tensor written into her own file; one who planted a directory
there made ``run.checkpoint()`` raise IsADirectoryError and killed training.
Now the buffer is an anonymous memfd handed to the daemon with SCM_RIGHTS:
there is no name to plant.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from ckptd_client import paths
from helpers import DaemonProc, db_rows, env_for
from users import User, need_users

pytestmark = need_users

VALUE = 1234.5678
TRAINER = """
import os, sys, ckptd_client as ckptd, torch
run = ckptd.init(name="shm")
print(os.getpid(), run.id, flush=True)
sys.stdin.readline()  # the attacker plants now
h = run.checkpoint({"w": torch.full((4096,), VALUE)}, step=1)
try:
    h.wait(timeout=60)
    print("committed", flush=True)
except Exception as exc:
    print("failed", type(exc).__name__, exc, flush=True)
run.log({"after": 1.0}, step=2)
print("alive", flush=True)
run.finish()
""".replace("VALUE", repr(VALUE))


@pytest.fixture
def loose_sysctls() -> Iterator[None]:
    """fs.protected_regular / protected_symlinks at 0 (the kernel default on many
    systems): the fix must not rely on them. Restored afterwards."""
    saved = {}
    for name in ("protected_regular", "protected_symlinks"):
        path = Path("/proc/sys/fs") / name
        with contextlib.suppress(OSError):
            saved[path] = path.read_text()
            path.write_text("0")
    try:
        yield
    finally:
        for path, value in saved.items():
            with contextlib.suppress(OSError):
                path.write_text(value)


@pytest.mark.parametrize("planted", ["file", "directory"])
def test_planted_buffer_names_get_nothing_and_kill_nothing(
        home: Path, daemon: DaemonProc, attacker: User, loose_sysctls: None,
        planted: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(TRAINER)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_for(home),
                            cwd=home.parent)
    names: list[str] = []
    held: list[int] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        pid, run_id = proc.stdout.readline().split()
        # every name an attacker can compute: the old scheme's, for this trainer
        # and the pids after it
        names = [f"/dev/shm/ckptd-{os.getuid()}-{paths.short_hash(home)}-{p}-{run_id}"
                 for p in range(int(pid), int(pid) + 3)]
        for name in names:
            cmd = f"umask 0; : > {name}" if planted == "file" else f"mkdir -m 0777 {name}"
            attacker.run("sh", "-c", cmd, check=True)
            if planted == "file":  # she keeps it open: an unlink later does not hide it
                held.append(os.open(name, os.O_RDONLY))
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        assert "alive" in out, f"training died:\n{out}\n{err}"
        needle = struct.pack("<f", VALUE) * 16
        for fd in held:
            data = os.pread(fd, 1 << 20, 0)
            assert needle not in data and len(data) == 0, f"her file got {len(data)} bytes"
        if planted == "directory":
            assert all(os.listdir(name) == [] for name in names)
        assert "committed" in out, out + err
    finally:
        for fd in held:
            os.close(fd)
        for name in names:
            with contextlib.suppress(OSError):
                os.rmdir(name) if planted == "directory" else os.unlink(name)
    assert db_rows(home, "SELECT step, status FROM checkpoints") == [(1, "committed")]
