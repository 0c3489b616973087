"""Where a home, its store and its socket live (SPEC section 3).

Shared by the client and the daemon so both sides always agree on the
socket for a given home.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DB_NAME = "ckptd.db"
LOCK_NAME = "daemon.lock"
DAEMON_LOG = "daemon.log"
SPOOL_DIR = "spool"
RUNS_DIR = "runs"
#: Longest socket path we use (AF_UNIX allows 107 bytes; keep a margin).
MAX_SOCKET_PATH = 100


def home_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """The data home: argument, else ``CKPTD_HOME``, else XDG data dir."""
    if home is not None:
        return Path(home).expanduser().absolute()
    env = os.environ.get("CKPTD_HOME")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "ckptd"


def socket_path(home: Path) -> Path:
    """The daemon's socket for ``home``.

    ``CKPTD_SOCKET`` wins. Under ``XDG_RUNTIME_DIR`` the default home keeps
    the plain name of the SPEC; any other home gets a suffix derived from
    its path, so two homes never share one socket (one daemon per home).
    A socket path is limited to 107 bytes, which deep homes would exceed;
    we fall back to a short path in /tmp named by the home's hash.
    """
    env = os.environ.get("CKPTD_SOCKET")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        name = "ckptd.sock"
        if home != home_dir(None) or os.environ.get("CKPTD_HOME"):
            name = f"ckptd-{short_hash(home)}.sock"
        path = Path(runtime) / "ckptd" / name
        if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
            return path
        # too long to bind: the daemon exited at start-up, respawned for ever
    path = home / "run" / "ckptd.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        return Path("/tmp") / f"ckptd-{os.getuid()}" / f"{short_hash(home)}.sock"
    return path


def short_hash(home: Path) -> str:
    """A short stable name for ``home`` (socket and snapshot-buffer names)."""
    return hashlib.sha256(os.fsencode(home)).hexdigest()[:12]


def db_path(home: Path) -> Path:
    return home / DB_NAME


def spool_dir(home: Path) -> Path:
    return home / SPOOL_DIR


def run_dir(home: Path, run_id: str) -> Path:
    return home / RUNS_DIR / run_id


def checkpoints_dir(home: Path, run_id: str) -> Path:
    return run_dir(home, run_id) / "checkpoints"
