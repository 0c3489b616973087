"""RPC operations that control the daemon itself."""

from __future__ import annotations

import os
import threading
from typing import Any

from . import __version__
from .daemon import Conn, Daemon, rpc


@rpc("status")
def status(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    return {
        "running": True,
        "pid": os.getpid(),
        "home": os.fspath(daemon.home),
        "socket": os.fspath(daemon.socket_path),
        "version": __version__,
        "started": daemon.started,
        "connections": len(daemon.conns),
        "queued": daemon.queue.qsize(),
    }


@rpc("stop")
def stop(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    # reply first, then stop: the caller waits for the socket to disappear
    threading.Timer(0.05, daemon.request_stop).start()
    return {"stopping": os.getpid()}


@rpc("flush_spool")
def flush_spool(daemon: Daemon, args: dict[str, Any], conn: Conn) -> bool:
    daemon.ingest_spools_now()
    return True
