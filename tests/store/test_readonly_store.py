"""A store on a read-only filesystem (a mounted backup, a snapshot) can still be read.

``mode=ro`` needs to open the WAL index for writing; a read-only mount
refused it and every reading command said "not a readable ckptd store".
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DaemonProc, ckptd, run_script


@pytest.fixture
def ro_mount(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs",
                                            os.fspath(mnt)], capture_output=True).returncode:
        pytest.skip("needs root and tmpfs mounts")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", os.fspath(mnt)], check=False)


def test_store_on_read_only_filesystem_is_readable(home: Path, ro_mount: Path) -> None:
    d = DaemonProc(home)
    d.start()
    try:
        run_script(home, """
            import ckptd_client as ckptd
            with ckptd.init(name="archived") as run:
                run.log({"loss": 0.5}, step=3)
        """)
    finally:
        d.stop()
    copy = ro_mount / "home"
    shutil.copytree(home, copy, ignore=shutil.ignore_patterns("run", "spool"))
    subprocess.run(["mount", "-o", "remount,ro", os.fspath(ro_mount)], check=True)
    ls = ckptd(copy, "ls")
    assert ls.returncode == 0 and "archived" in ls.stdout, ls.stderr
    metrics = ckptd(copy, "metrics", "archived", "--format", "csv")
    assert metrics.returncode == 0 and "3,loss,0.5" in metrics.stdout, metrics.stderr
    assert ckptd(copy, "show", "archived").returncode == 0
