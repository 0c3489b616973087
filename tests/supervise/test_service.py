"""``ckptd service`` and the systemd unit. systemd is not needed (nor running here):
the unit is linted with ``systemd-analyze verify``, and install degrades clearly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, ckptd, env_for

from ckptd.supervise.service import render_unit

ANALYZE = shutil.which("systemd-analyze")


def service_env(home: Path, tmp_path: Path) -> dict[str, str]:
    # no reachable user manager, even on a machine where systemd runs: the
    # test must never enable a real service or lingering
    return env_for(home, XDG_CONFIG_HOME=os.fspath(tmp_path / "config"),
                   DBUS_SESSION_BUS_ADDRESS="unix:path=/nonexistent",
                   XDG_RUNTIME_DIR=os.fspath(tmp_path / "no-runtime"))


def verify(unit: Path) -> None:
    proc = subprocess.run([ANALYZE, "verify", os.fspath(unit)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_checked_in_unit_is_the_rendered_one() -> None:
    assert (REPO / "systemd" / "ckptd.service").read_text() == render_unit()
    text = render_unit()
    for line in ("Type=notify", "Restart=always", "KillMode=process", "WatchdogSec=",
                 "WantedBy=default.target"):
        assert line in text


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    verify(REPO / "systemd" / "ckptd.service")
    custom = tmp_path / "ckptd.service"
    custom.write_text(render_unit(f"{sys.executable} -m ckptd daemon",
                                  home=tmp_path / "a home with spaces"))
    verify(custom)


def test_install_writes_the_unit_and_degrades_without_systemd(home: Path,
                                                              tmp_path: Path) -> None:
    env = service_env(home, tmp_path)
    unit = tmp_path / "config" / "systemd" / "user" / "ckptd.service"
    res = ckptd(home, "service", "install", env=env)
    assert res.returncode == 0, res.stderr
    assert unit.exists()
    text = unit.read_text()
    assert f"ExecStart={sys.executable} -m ckptd daemon" in text
    assert f"Environment=CKPTD_HOME={home}" in text  # a non-default home is kept
    assert "not reachable" in res.stdout and "ckptd start" in res.stdout
    if ANALYZE:
        verify(unit)

    res = ckptd(home, "service", "status", env=env)
    assert res.returncode == 0 and "installed" in res.stdout
    res = ckptd(home, "service", "uninstall", env=env)
    assert res.returncode == 0 and not unit.exists()
    assert "absent" in ckptd(home, "service", "status", env=env).stdout


def test_daemon_speaks_the_units_notify_and_watchdog_protocol(home: Path, tmp_path: Path) -> None:
    """What Type=notify and WatchdogSec rely on, without systemd: READY=1 once
    serving, WATCHDOG=1 pings while alive, STOPPING=1 on SIGTERM."""
    import socket

    from helpers import DaemonProc

    addr = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.fspath(addr))
    sock.settimeout(20)
    d = DaemonProc(home, env=env_for(home, NOTIFY_SOCKET=os.fspath(addr),
                                     WATCHDOG_USEC="30000000"))
    d.start(wait=False)
    try:
        got: list[str] = []
        while not any("WATCHDOG=1" in m for m in got):
            got.append(sock.recv(4096).decode())
        assert got[0].startswith("READY=1") and f"MAINPID={d.pid}" in got[0], got
        assert d.terminate() == 0
        while not any("STOPPING=1" in m for m in got):
            got.append(sock.recv(4096).decode())
    finally:
        d.stop()
        sock.close()
