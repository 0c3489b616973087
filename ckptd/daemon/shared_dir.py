"""A run's checkpoints in a directory every node shares (NFS, Lustre).

``init(checkpoint_dir=D)`` / ``CKPTD_CHECKPOINT_DIR=D``: the run's
checkpoints live in ``D/<run-id>/`` and the run's home (the store of rank
0's node, which owns the run) holds a symlink ``runs/<run-id>/checkpoints
-> D/<run-id>``. Every part of the daemon and CLI that works on
``paths.checkpoints_dir`` (commit, reconcile, verify, gc, retention, export,
resume) follows the link unchanged, and only the owning node's daemon ever
sweeps, commits or prunes there: the other nodes' homes have no link (their
ranks write their shards into ``D/<run-id>/`` directly and fsync them from
the node that wrote them, see ``ckptd_client.dcp``: on NFS a client's fsync
flushes that client's writes only).

One RPC, ``checkpoint_dir`` (rank 0, before its first checkpoint): create
``D/<run-id>/`` and the link; idempotent; refuses to move a run whose
checkpoints are already somewhere else.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd_client import paths
from ckptd_client.errors import CheckpointError, NotFound
from ckptd_client.identity import valid_run_id
from ckptd_client.spool import fsync_dir

if TYPE_CHECKING:
    from ckptd.daemon.server import Conn, Daemon


def _abs_dir(value: Any, what: str) -> Path:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value \
            or len(value) > 4096:
        raise CheckpointError(f"{what} must be an absolute path")
    return Path(value)


def rpc_checkpoint_dir(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    run = args.get("run")
    if not isinstance(run, str) or not valid_run_id(run):
        raise NotFound("checkpoint_dir needs a run id")
    shared = _abs_dir(args.get("dir"), "checkpoint_dir")
    target = shared / run
    try:
        shared.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):
            target.mkdir(mode=0o700)
        st = os.stat(target)
    except OSError as exc:
        raise CheckpointError(f"checkpoint_dir {target}: {exc.strerror or exc}; it must be a "
                              "directory you can write, the same path on every node") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise CheckpointError(f"checkpoint_dir {target} is not a directory of yours (uid "
                              f"{st.st_uid}); refusing to keep checkpoints there")
    link = paths.checkpoints_dir(daemon.home, run)
    link.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _ in range(2):
        if link.is_symlink():
            if os.readlink(link) == os.fspath(target):
                return {"path": os.fspath(target)}
            raise CheckpointError(f"run {run} keeps its checkpoints in {os.readlink(link)}, "
                                  f"not {target}; pass the same checkpoint_dir it started with")
        if link.is_dir():
            try:
                link.rmdir()  # an empty checkpoints/ of the home: nothing to move
            except OSError:
                raise CheckpointError(f"run {run} already has checkpoints in {link}; "
                                      "checkpoint_dir cannot move them (start a new run, or "
                                      "keep the home's)") from None
        try:
            os.symlink(target, link)
        except FileExistsError:
            continue  # made meanwhile: judge it as above
        # CRASH WINDOW: a link whose directory entry is not durable yet. A power
        # cut may lose it; no checkpoint is committed through it before this
        # fsync returns, and the next checkpoint() makes it again.
        fsync_dir(link.parent)
        fsync_dir(shared)
        return {"path": os.fspath(target)}
    raise CheckpointError(f"checkpoint_dir: {link} keeps changing; is another daemon "
                          "using this home?")
