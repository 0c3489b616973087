"""RPC operations that control the daemon itself."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from ckptd_client.errors import CkptdError

from ckptd import __version__

if TYPE_CHECKING:
    from ckptd.daemon.server import Conn, Daemon
    from ckptd.store.writer import Store


class RunsConnected(CkptdError):
    """``ckptd stop`` while runs are connected (``--force`` overrides)."""


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


def connected_runs(daemon: Daemon) -> list[dict[str, Any]]:
    """Runs with a live connection (a trainer or its supervisor), named."""
    ids = sorted({run for run, _attempt in daemon.connected_runs()})
    if not ids:
        return []

    def names(store: Store) -> dict[str, str]:
        marks = ",".join("?" for _ in ids)
        return dict(store.conn.execute(f"SELECT id, name FROM runs WHERE id IN ({marks})",
                                       ids).fetchall())

    found = daemon.call_writer(names)
    return [{"id": i, "name": found.get(i) or i} for i in ids]


def describe(runs: list[dict[str, Any]]) -> str:
    return ", ".join(r["id"] if r["name"] == r["id"] else f"{r['name']} ({r['id']})"
                     for r in runs)


def stop(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    """Stop the daemon, unless runs are connected and ``force`` is not set.

    A connected client starts a new daemon within a second of losing this
    one (its events must go somewhere), so stopping under live runs is
    pointless unless meant (an upgrade): refuse, naming them.
    """
    runs = connected_runs(daemon)
    if runs and not args.get("force"):
        raise RunsConnected(
            f"stop: {len(runs)} run(s) connected: {describe(runs)}; their clients would start "
            "a new daemon at once. Stop them first, or pass --force")
    # reply first, then stop: the caller waits for the socket to disappear
    threading.Timer(0.05, daemon.request_stop).start()
    return {"stopping": os.getpid(), "connected": runs}


def flush_spool(daemon: Daemon, args: dict[str, Any], conn: Conn) -> bool:
    daemon.ingest_spools_now()
    return True
