"""Adopted checkpoints, daemon side: a framework's own checkpoint file or folder
(Lightning ``.ckpt``, Hugging Face ``checkpoint-N/``, DCP folders) made a ckptd
checkpoint with the same promises as a native one.

The RPC ``ckpt_adopt`` copies the given file or folder into the staging
directory of :func:`ckptd.checkpoints.commit_checkpoint`, as
``step-<N>.ckptd-tmp/adopted/<name>``, and the native protocol does the rest
(manifest, staging fsync, commit record, rename, parent fsync, row; then
retention). It is a copy, not a link: frameworks rewrite files in place
(``last.ckpt``), which would change a hard-linked checkpoint under its hash.

Order, inside the staging directory (each file, then each directory
bottom-up, all before the manifest names them):

1. each file is copied, fsynced and hashed (chunk hashes of the copy, with
   the same function and algorithm as ``tensors.bin``);
2. each directory is fsynced, deepest first, so every entry is durable
   before the directory that holds it is;
3. the per-file hashes go into the manifest, whose own hash is the row's:
   damage to any adopted byte is found by ``ckptd_client.integrations.adopt``.

The manifest's tree is ``{"state": {ADOPTED_KEY: <name>}}``, an ordinary
native checkpoint with an empty ``tensors.bin`` to every other reader
(``ckpt ls``, gc, retention, reconcile).
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd_client.checkpoint import format as fmt
from ckptd_client.errors import CheckpointError, NotFound
from ckptd_client.identity import valid_run_id
from ckptd_client.integrations.adopt import ADOPTED_DIR, ADOPTED_KEY
from ckptd_client.spool import fsync_dir

from ckptd.daemon import validate
from ckptd.daemon.checkpoints import (
    Request,
    _commit_started,
    check_space,
    commit_checkpoint,
    prune,
    run_lock,
)

if TYPE_CHECKING:
    from ckptd.daemon.server import Conn, Daemon

log = logging.getLogger("ckptd.adopt")


def _copy_file(src: Path, dst: Path) -> dict[str, Any]:
    """Copy, fsync, then hash the copy (what will be verified is what is on our disk)."""
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fin).st_size
            done = 0
            while done < size:
                n = os.copy_file_range(fin, fout, size - done)
                if n == 0:
                    break  # the framework truncated it meanwhile: hashed as it is now
                done += n
            # CRASH WINDOW: a copied file not yet fsynced lives only in the staging
            # directory, which reconcile removes at the next start.
            os.fsync(fout)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    size = dst.stat().st_size
    if size == 0:
        return {"bytes": 0, fmt.HASH_ALGO: []}
    with open(dst, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
        return {"bytes": size, fmt.HASH_ALGO: fmt.chunk_hashes(mm, size, fmt.HASH_ALGO)}


def _tree_size(src: Path) -> int:
    if src.is_file():
        return src.stat().st_size
    return sum(p.lstat().st_size for p in src.rglob("*") if p.is_file())


def stager(src: Path, step: int) -> Callable[[Path], dict[str, Any]]:
    """The ``stage`` step of :func:`commit_checkpoint` for a file or folder ``src``."""

    def stage(staging: Path) -> dict[str, Any]:
        check_space(staging, _tree_size(src), step)
        root = staging / ADOPTED_DIR
        root.mkdir(mode=0o700)
        files: dict[str, dict[str, Any]] = {}
        dirs = [root]
        if src.is_file():
            files[src.name] = _copy_file(src, root / src.name)
        else:
            for here, subdirs, names in os.walk(src):
                rel = Path(here).relative_to(src.parent)
                (root / rel).mkdir(mode=0o700, exist_ok=True)
                dirs.append(root / rel)
                for name in sorted(names):
                    p = Path(here) / name
                    mode = p.lstat().st_mode
                    if not stat.S_ISREG(mode):
                        raise CheckpointError(f"adopt {p}: not a regular file (links and "
                                              "devices are not adopted)")
                    files[os.fspath(rel / name)] = _copy_file(p, root / rel / name)
                for d in subdirs:
                    if (Path(here) / d).is_symlink():
                        raise CheckpointError(f"adopt {Path(here) / d}: a symbolic link "
                                              "(not adopted)")
        # every entry durable before the directory holding it: deepest first
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        return {"root": src.name, "algo": fmt.HASH_ALGO, "chunk": fmt.CHUNK, "files": files}

    return stage


def rpc_adopt(daemon: Daemon, args: dict[str, Any], conn: Conn) -> dict[str, Any]:
    """Adopt ``args["path"]`` as checkpoint ``step`` of ``run``; returns its row's summary.

    The peer is the owner (SO_PEERCRED), so it may name any path it can read;
    the path must be absolute and a regular file or a folder, not a link.
    """
    run, path = args.get("run"), args.get("path")
    if not isinstance(run, str) or not valid_run_id(run):
        raise NotFound(f"ckpt_adopt: no run {run!r}")
    validate._int(args, "step", minimum=0)
    validate._int(args, "attempt", minimum=1)
    metrics = args.get("metrics") or {}
    if not isinstance(metrics, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise CheckpointError("adopt: metrics must be an object of numbers")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise CheckpointError(f"adopt: {path!r} must be an absolute path")
    src = Path(path)
    try:
        mode = src.lstat().st_mode
    except OSError as exc:
        raise CheckpointError(f"adopt {src}: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise CheckpointError(f"adopt {src}: not a regular file or folder")
    step = args["step"]
    req = Request(id=0, run=run, attempt=args["attempt"], step=step, size=0,
                  tree={"state": {ADOPTED_KEY: src.name}, "rng": None}, tensors=[],
                  metrics=metrics, blocked_s=None)
    _commit_started(run, 1)  # a resume waits for it like for a native commit
    try:
        with run_lock(run):
            row = commit_checkpoint(daemon, req, -1, stage=stager(src, step))
    finally:
        _commit_started(run, -1)
    try:
        prune(daemon, run)
    except Exception:  # noqa: BLE001 - retention failing must not undo a commit
        log.exception("retention for run %s failed", run)
    final = daemon.home / row["path"] / ADOPTED_DIR / src.name
    return {"step": step, "hash": row["hash"], "path": os.fspath(final),
            "persist_s": row["persist_s"]}
