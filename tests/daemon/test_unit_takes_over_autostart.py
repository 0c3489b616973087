"""`systemctl restart ckptd` while runs are active: in the gap between the old
daemon's exit and the new one's start a client finds no socket and
autostarts a daemon, which takes the home's lock. The unit's daemon used to
exit with "another ckptd daemon is already running" (the restart failed, and
the home was left to a daemon that no unit stops at shutdown; found in
tests/boot). Now the unit's daemon (``NOTIFY_SOCKET`` set, not autostarted)
asks the autostarted one to stop and serves in its place. A daemon started
by hand still refuses a home that is served."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from helpers import DaemonProc, env_for, wait_for


def test_the_units_daemon_takes_over_from_an_autostarted_one(home: Path,
                                                            tmp_path: Path) -> None:
    auto = DaemonProc(home, env=env_for(home, CKPTD_AUTOSTARTED="1"))
    auto.start()
    addr = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.fspath(addr))
    sock.settimeout(30)
    unit = DaemonProc(home, env=env_for(home, NOTIFY_SOCKET=os.fspath(addr)))
    try:
        unit.start(wait=False)
        got = sock.recv(4096).decode()
        assert got.startswith("READY=1") and f"MAINPID={unit.pid}" in got, got
        assert auto.proc is not None and auto.proc.wait(timeout=30) == 0  # drained, exited
        assert unit.proc is not None and unit.proc.poll() is None
        assert (home / "daemon.lock").read_text().strip() == str(unit.pid)
        assert "taking the home over from daemon pid" in (home / "daemon.log").read_text()
    finally:
        unit.stop()
        auto.stop()
        sock.close()


def test_a_daemon_started_by_hand_still_refuses_a_served_home(home: Path,
                                                             tmp_path: Path) -> None:
    auto = DaemonProc(home, env=env_for(home, CKPTD_AUTOSTARTED="1"))
    auto.start()
    other = DaemonProc(home)  # no NOTIFY_SOCKET: not systemd's
    try:
        other.start(wait=False)
        assert other.proc is not None and other.proc.wait(timeout=30) == 1
        assert auto.proc is not None and auto.proc.poll() is None
        wait_for(lambda: "already running" in (home / "daemon.log").read_text())
    finally:
        other.stop()
        auto.stop()
