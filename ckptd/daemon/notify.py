"""sd_notify without libsystemd: READY, STOPPING and WATCHDOG pings.

A no-op when ``NOTIFY_SOCKET`` is unset (not under systemd), so the daemon
behaves the same in tests and in a terminal.
"""

from __future__ import annotations

import os
import socket


def _send(state: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


def ready() -> bool:
    return _send(f"READY=1\nMAINPID={os.getpid()}")


def stopping() -> bool:
    return _send("STOPPING=1")


def watchdog() -> bool:
    """Ping systemd's watchdog (``WatchdogSec``); the accept loop calls this each second."""
    if not os.environ.get("WATCHDOG_USEC"):
        return False
    return _send("WATCHDOG=1")
