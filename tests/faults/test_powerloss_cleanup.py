"""The power-loss tests' loop mounts are released on every way out: a failing
test body, a SIGTERM (a CI job's timeout), and a SIGKILL of the test process
(the next power-loss mount releases it). An interrupted CI run had left
``.../test_checkpoints_survive_power0/cutmnt`` mounted on its loop device."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import powerloss
import psutil
import pytest
from helpers import REPO

pytestmark = [
    pytest.mark.powerloss,
    pytest.mark.skipif(powerloss.unavailable() is not None,
                       reason=powerloss.unavailable() or ""),
]

#: A test process holding a cut mount, with a process working in it (like the
#: daemon a check starts): prints "mounted <holder pid>", then waits.
HOLDER = f"""
import subprocess, sys, time
from pathlib import Path
sys.path.insert(0, {os.fspath(REPO / "tests")!r})
import powerloss

image, mnt = Path(sys.argv[1]), Path(sys.argv[2])
with powerloss.mounted_cut(image, mnt):
    (mnt / "held").write_text("x")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]);"
                               " time.sleep(600)", str(mnt / "held")], start_new_session=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    print("mounted", holder.pid, flush=True)
    time.sleep(600)
"""


def _image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", os.fspath(path)], check=True, capture_output=True)
    return path


def _released(image: Path, mnt: Path) -> bool:
    return not powerloss.mounted(mnt) and powerloss.loop_devices(image) == []


def _hold(image: Path, mnt: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, os.fspath(image), os.fspath(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[:1] == ["mounted"], proc.stderr.read() if proc.stderr else ""
    assert powerloss.mounted(mnt) and powerloss.loop_devices(image)
    return proc, int(line[1])


def test_a_failing_body_releases_the_mount(tmp_path: Path) -> None:
    image, mnt = _image(tmp_path / "cut.img"), tmp_path / "cutmnt"
    try:
        with pytest.raises(RuntimeError), powerloss.mounted_cut(image, mnt) as root:
            assert powerloss.mounted(root)
            (root / "half-checked").write_text("x")
            raise RuntimeError("an assertion of check_cut failed")
        assert _released(image, mnt)
    finally:
        powerloss.release(image, mnt)


def test_sigterm_and_sigkill_of_the_test_process_release_its_mounts(tmp_path: Path) -> None:
    killed = (_image(tmp_path / "killed.img"), tmp_path / "killed" / "cutmnt")
    termed = (_image(tmp_path / "termed.img"), tmp_path / "termed" / "cutmnt")
    procs: list[subprocess.Popen[str]] = []
    try:
        victim, victim_holder = _hold(*killed)
        procs.append(victim)
        live, live_holder = _hold(*termed)
        procs.append(live)
        # SIGKILL: no cleanup can run; the mount (and its process) stays behind
        victim.kill()
        victim.communicate(timeout=30)
        assert powerloss.mounted(killed[1]) and psutil.pid_exists(victim_holder)
        # the next power-loss mount releases it (release_stale), not the live one
        assert killed[1] in powerloss.release_stale()
        assert _released(*killed)
        assert not psutil.pid_exists(victim_holder) or \
            psutil.Process(victim_holder).status() == psutil.STATUS_ZOMBIE
        assert powerloss.mounted(termed[1])
        # SIGTERM (a CI timeout): the test process releases its mount as it ends
        live.send_signal(signal.SIGTERM)
        _, err = live.communicate(timeout=60)
        assert live.returncode != -signal.SIGTERM, "killed outright, with the mount held"
        assert "KeyboardInterrupt" in err, err
        assert _released(*termed)
        assert not psutil.pid_exists(live_holder) or \
            psutil.Process(live_holder).status() == psutil.STATUS_ZOMBIE
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for image, mnt in (killed, termed):
            powerloss.release(image, mnt)  # also kills the holders
        for proc in procs:
            proc.communicate(timeout=30)
