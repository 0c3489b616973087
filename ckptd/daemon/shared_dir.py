"""A run's checkpoints in a directory every node shares (NFS, Lustre).

``init(checkpoint_dir=D)`` / ``CKPTD_CHECKPOINT_DIR=D``: the run's
checkpoints live in ``D/<run-id>/`` and the run's home (the store of rank
0's node, which owns the run) holds a symlink ``runs/<run-id>/checkpoints
-> D/<run-id>``. Every part of the daemon and CLI that works on
``paths.checkpoints_dir`` (commit, reconcile, verify, gc, retention, export,
resume) follows the link unchanged, and only the owning node's daemon ever
sweeps, commits or prunes there: the other nodes' homes have no link (their
ranks write their shards into ``D/<run-id>/`` directly, see
``ckptd_client.dcp``, and their daemons make them durable).

Two RPCs:

* ``checkpoint_dir`` (rank 0, before its first checkpoint): create
  ``D/<run-id>/`` and the link; idempotent; refuses to move a run whose
  checkpoints are already somewhere else.
* ``dcp_shard_durable`` (every rank, to its own node's daemon): fsync and
  hash the rank's shard files of a staged DCP step, so each shard is made
  durable by the daemon of the node that wrote it (on NFS a client's fsync
  flushes that client's writes only).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd_client import paths
from ckptd_client.checkpoint import format as fmt
from ckptd_client.dcp import DCP_STAGING, RNG_PREFIX, sha256_file
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


def rpc_dcp_shard_durable(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    """fsync and sha256 one rank's files of a staged DCP step (see the module doc)."""
    step, rank = args.get("step"), args.get("rank")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 \
            or not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise CheckpointError("dcp_shard_durable needs a step and a rank")
    staging = _abs_dir(args.get("dir"), "dcp_shard_durable: dir")
    if staging.name != fmt.step_dir_name(step) + DCP_STAGING:
        raise CheckpointError(f"dcp_shard_durable: {staging} is not the staging directory "
                              f"of step {step}")
    mine = re.compile(rf"__{rank}_[0-9]+\.distcp|{re.escape(RNG_PREFIX)}{rank}\.pt")
    files: dict[str, Any] = {}
    try:
        for name in sorted(os.listdir(staging)):
            if mine.fullmatch(name):
                # sha256_file opens with O_NOFOLLOW and fsyncs before hashing:
                # the hash recorded is of bytes that are on stable storage
                size, digest = sha256_file(staging / name)
                files[name] = {"bytes": size, "sha256": digest}
        # CRASH WINDOW closed: the shard files' directory entries are durable too
        fsync_dir(staging)
    except OSError as exc:
        raise CheckpointError(f"checkpoint step {step}: rank {rank}: make {staging} "
                              f"durable: {exc.strerror or exc}") from None
    if not files:
        raise CheckpointError(f"checkpoint step {step}: rank {rank} has no shard in {staging}"
                              " (is the checkpoint directory shared by every node?)")
    return {"files": files}
