"""Daemon side of a sharded (DCP) checkpoint: publish what the ranks staged.

The ranks wrote and fsynced their shards into ``step-<N>.dcp.ckptd-tmp/``
and rank 0 wrote ``manifest.json`` listing every file with its size and
sha256 (``ckptd_client.dcp``). Here the daemon checks the manifest and every
file's size, fsyncs every file and the directory again (so durability does
not rest on the trainer having done it), then publishes through the same
ordered rename-then-row protocol as any checkpoint (``checkpoints.publish``).
A crash at any point before the rename leaves a staging directory, which the
next start removes; after it, reconcile records or marks the step as usual.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

from ckptd_client import paths
from ckptd_client.checkpoint import format as fmt
from ckptd_client.dcp import DCP_STAGING, OWNER_FILE, verify_files
from ckptd_client.errors import CheckpointError, NotFound
from ckptd_client.identity import valid_run_id
from ckptd_client.spool import fsync_dir

from ckptd.daemon.checkpoints import publish, run_lock

if TYPE_CHECKING:
    from ckptd.daemon.server import Conn, Daemon


def rpc_dcp_commit(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    run, attempt, step = args.get("run"), args.get("attempt"), args.get("step")
    if not isinstance(run, str) or not valid_run_id(run) or not isinstance(step, int) \
            or isinstance(step, bool) or step < 0 or not isinstance(attempt, int):
        raise NotFound("dcp_commit needs a run id, an attempt and a step")
    staging = paths.checkpoints_dir(daemon.home, run) / (fmt.step_dir_name(step) + DCP_STAGING)
    if args.get("staging") != staging.name:
        raise CheckpointError(f"dcp_commit: staging directory must be {staging.name}")
    metrics = args.get("metrics") or {}
    blocked = args.get("blocked_s")
    if not isinstance(metrics, dict) or not isinstance(blocked, (int, float)):
        raise CheckpointError("dcp_commit: metrics must be an object, blocked_s a number")
    t0 = time.monotonic()
    with run_lock(run):
        manifest, digest = fmt.read_manifest(staging)
        if not manifest.get("dcp") or manifest.get("step") != step or manifest.get("run") != run:
            raise CheckpointError(f"dcp_commit: {staging} holds no DCP manifest of step {step}")
        verify_files(staging, manifest, sizes_only=True)
        # The daemon takes the step over: no longer rank 0's. CRASH WINDOW (from
        # here to the rename): a restarted daemon removes the staging directory
        # (its writer is not named any more), and rank 0 was told nothing but a
        # lost connection: the step fails, none is torn.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging / OWNER_FILE)
        total = 0
        for name in manifest["files"]:
            fd = os.open(staging / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
        total += (staging / fmt.MANIFEST_FILE).stat().st_size
        fsync_dir(staging)
        timings = {"fsync": time.monotonic() - t0}
        return publish(daemon, run, attempt, step, staging, row_bytes=total,
                       manifest_hash=digest, metrics=metrics, blocked_s=float(blocked),
                       created=manifest.get("created") or time.time(), t0=t0, timings=timings)
