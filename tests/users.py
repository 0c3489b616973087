"""A real second local user for the tests of SPEC promise 6 (created with
``useradd``, removed afterwards), and a shared directory she can reach."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

USERADD = shutil.which("useradd")
USERDEL = shutil.which("userdel")
RUNUSER = shutil.which("runuser")
need_users = pytest.mark.skipif(
    os.geteuid() != 0 or not (USERADD and USERDEL and RUNUSER),
    reason="needs root, useradd, userdel and runuser to act as a second user")


@dataclass
class User:
    name: str
    uid: int
    gid: int

    def run(self, *cmd: str, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """``cmd`` as this user (cwd /, a minimal environment)."""
        assert RUNUSER is not None
        return subprocess.run([RUNUSER, "-u", self.name, "--", *cmd], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/",
                              env={"PATH": "/usr/bin:/bin", **(env or {})}, check=check)


@contextlib.contextmanager
def second_user(tag: str) -> Iterator[User]:
    """A fresh user (unique name), deleted with everything she owns in /tmp, /dev/shm."""
    assert USERADD and USERDEL
    name = f"ck{tag[:8]}{os.getpid() % 10000}{os.urandom(2).hex()}"
    subprocess.run([USERADD, "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        pw = pwd.getpwnam(name)
        yield User(name, pw.pw_uid, pw.pw_gid)
    finally:
        uid = pwd.getpwnam(name).pw_uid
        for base in ("/dev/shm", "/tmp"):
            with contextlib.suppress(OSError):
                for entry in os.scandir(base):
                    with contextlib.suppress(OSError):
                        if entry.stat(follow_symlinks=False).st_uid == uid:
                            if entry.is_dir(follow_symlinks=False):
                                shutil.rmtree(entry.path, ignore_errors=True)
                            else:
                                os.unlink(entry.path)
        subprocess.run([USERDEL, name], capture_output=True)


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A 0755 directory under /tmp (pytest's own tmp dirs are 0700: a second user
    could not even reach a home there, which would make these tests pass for
    the wrong reason)."""
    d = Path(f"/tmp/ckptd-t-{os.getpid()}-{os.urandom(3).hex()}")
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        from helpers import kill_processes_under

        kill_processes_under(d)  # daemons of homes in here: the home fixture never saw them
        shutil.rmtree(d, ignore_errors=True)
