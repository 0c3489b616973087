"""Sharded checkpoints of many ranks, in the ``torch.distributed.checkpoint`` format.

Under an initialized process group ``run.checkpoint(state, step)`` is
collective. The order, and the crash window each step closes:

1. rank 0 creates ``step-<N>.dcp.ckptd-tmp/`` (a staging name: never read,
   removed at the daemon's next start); every rank waits for it.
2. ``dcp.save`` with DCP's own ``FileSystemWriter(sync_files=True)``: every
   rank writes and fsyncs its ``__<rank>_0.distcp``; rank 0 writes
   ``.metadata``. Each rank also writes ``ckptd-rng-<rank>.pt`` (its RNG
   states, ``torch.load(weights_only=True)``-safe) and fsyncs it.
   CRASH WINDOW: a rank killed here leaves a staging directory only.
3. Each rank's node daemon fsyncs and hashes (sha256) that rank's files;
   rank 0 gathers the hashes (a collective: it returns only when every
   rank's shard is durable), hashes
   ``.metadata``, writes ``manifest.json`` (the ckptd manifest, listing every
   file with its size and hash) and fsyncs it and the directory.
4. rank 0 asks the daemon (``dcp_commit``) to check sizes, fsync again, and
   publish: rename to ``step-<N>/``, fsync the parent, commit the row (the
   same ordered protocol as one process's checkpoint, ``ckptd.checkpoints``).
5. rank 0 tells every rank the outcome; each returns a resolved handle.

Several nodes: the step directories live in a directory every node shares
(``init(checkpoint_dir=D)`` / ``CKPTD_CHECKPOINT_DIR``): ``D/<run-id>/``
(:func:`checkpoint_root`). Each rank's files are made durable (fsync) and
hashed by its own node's daemon (``dcp_shard_durable``, step 3), and only
rank 0's daemon commits (step 4), through the home's link to ``D/<run-id>``
(``ckptd.daemon.shared_dir``). A rank that does not see the staging
directory rank 0 created says the directory is not shared, and the step fails
on every rank.

The step directory is a plain DCP checkpoint: ``torch.distributed.checkpoint.load``
reads it without ckptd (it ignores ``manifest.json``, ``tensors.bin`` and
the RNG files). Not done yet: the loop is blocked for the whole save (DCP
writes from the training process); an async variant (snapshot, then
``dcp.async_save`` into the same staging protocol) is the next step.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import paths, protocol, transport
from .checkpoint import format as fmt
from .checkpoint import restore as restoring
from .checkpoint import snapshot
from .errors import CheckpointError, CkptdError
from .spool import fsync_dir

if TYPE_CHECKING:
    from .run import Run

RNG_PREFIX = "ckptd-rng-"
METADATA = ".metadata"
#: Staging directory of a DCP step (ends in the sweepable staging suffix).
DCP_STAGING = ".dcp" + fmt.STAGING_SUFFIX


def in_process_group() -> bool:
    """True under an initialized ``torch.distributed`` process group (torch
    is never imported here: a script that did not import it has none)."""
    if "torch" not in sys.modules:
        return False
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()
    except Exception:  # noqa: BLE001
        return False


def checkpoint_root(run: Run) -> Path:
    """Where this rank sees the run's step directories: ``<checkpoint_dir>/<run-id>``
    when a shared directory is set (the home of rank 0's node links there),
    else the home's ``runs/<run-id>/checkpoints``."""
    if run.checkpoint_dir is not None:
        return run.checkpoint_dir / run.id
    return paths.checkpoints_dir(run.home, run.id)


def link_checkpoint_dir(run: Run) -> None:
    """Have the daemon of the run's home create ``<checkpoint_dir>/<run-id>`` and
    link the home's checkpoints there (once per process; see ``shared_dir``).

    :raises CkptdError: the directory cannot be used (the message says why).
    """
    if run.checkpoint_dir is None or getattr(run, "_linked_checkpoint_dir", False):
        return
    transport.call(run.home, "checkpoint_dir", {"run": run.id,
                                                "dir": os.fspath(run.checkpoint_dir)},
                   autostart=run._autostart, timeout=60)
    run._linked_checkpoint_dir = True


def sha256_file(path: Path) -> tuple[int, str]:
    """Size and sha256 of ``path``, after fsyncing it (the hash is of what is durable)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
        size = 0
        while True:
            chunk = os.read(fd, 8 << 20)
            if not chunk:
                break
            size += len(chunk)
            h.update(chunk)
    finally:
        os.close(fd)
    return size, h.hexdigest()


def _one_outcome(dist: Any, error: str | None) -> str | None:
    """Every rank learns whether any rank failed (the first error wins)."""
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def save(run: Run, state: Any, step: int, metrics: dict[str, Any] | None) -> Any:
    """Collective checkpoint of every rank's ``state`` (see the module doc)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from . import rng

    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise TypeError(f"checkpoint step must be a non-negative int, not {step!r}")
    values = {k: protocol.check_metric(k, v) for k, v in (metrics or {}).items()}
    handle = snapshot.CheckpointHandle(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    root = checkpoint_root(run)
    staging = root / (fmt.step_dir_name(step) + DCP_STAGING)
    t0 = time.perf_counter()
    error = None
    if rank == 0:
        try:
            link_checkpoint_dir(run)
            shutil.rmtree(staging, ignore_errors=True)  # an earlier failed try of this step
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            staging.mkdir(mode=0o700)
        except CkptdError as exc:
            error = f"checkpoint step {step}: {exc}"
        except OSError as exc:
            error = f"checkpoint step {step}: cannot create {staging}: {exc.strerror or exc}"
    error = _one_outcome(dist, error)
    if error is None and rank != 0 and not staging.is_dir():
        error = (f"checkpoint step {step}: rank {rank} (node {run.node_rank}) does not see "
                 f"{staging}, which rank 0 created: the checkpoint directory must be shared "
                 "by every node (init(checkpoint_dir=...) / CKPTD_CHECKPOINT_DIR on NFS or "
                 "Lustre, the same path everywhere)")
    error = _one_outcome(dist, error)
    if error is None:
        try:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(
                staging, single_file_per_rank=True, sync_files=True, thread_count=1))
        except Exception as exc:  # noqa: BLE001 - DCP gathers every rank's failure
            error = f"checkpoint step {step}: torch.distributed.checkpoint.save failed: {exc}"
    if error is None:
        try:
            buf = io.BytesIO()
            torch.save(rng.capture(), buf)
            fmt.write_durable(staging / f"{RNG_PREFIX}{rank}.pt", buf.getvalue())
        except OSError as exc:
            error = f"checkpoint step {step}: rank {rank}: write RNG state: {exc.strerror}"
    handle.blocked_s = time.perf_counter() - t0
    _test_fault(run, rank, step)
    files: dict[str, Any] = {}
    if error is None:
        try:
            # this rank's shard made durable and hashed by its own node's daemon
            files = transport.call(run.home, "dcp_shard_durable", {
                "dir": os.fspath(staging), "step": step, "rank": rank},
                autostart=run._autostart, timeout=600)["files"]
        except CkptdError as exc:
            error = f"checkpoint step {step}: rank {rank}: {exc}"
    # CRASH WINDOW: until every rank is past this gather, some shard may not be
    # durable; rank 0 commits nothing before it, so a rank killed here leaves
    # a staging directory only (removed by rank 0's daemon at its next start).
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, error or {"files": files, "node": run.node_rank,
                                               "host": socket.gethostname()})
    error = next((g for g in gathered if isinstance(g, str)), None)
    result: dict[str, Any] | None = None
    if rank == 0 and error is None:
        try:
            result = _commit(run, staging, step, values, handle.blocked_s, world,
                             {k: v for g in gathered for k, v in g["files"].items()},
                             [[r, g["node"], g["host"]] for r, g in enumerate(gathered)])
        except CkptdError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"checkpoint step {step}: {exc.strerror or exc}"
    outcome: list[Any] = [(result, error)]
    dist.broadcast_object_list(outcome, src=0)
    result, error = outcome[0]
    if error is not None:
        run._warn("ckpt-dcp", error)
        handle._resolve(None, CheckpointError(error))
    else:
        handle._resolve(dict(result or {}, blocked_s=handle.blocked_s), None)
    return handle


#: Test-only fault injection: ``<rank>:<step>`` SIGKILLs that rank in attempt 1's
#: checkpoint of that step, after its shard is durable and before the ranks
#: agree (the instant a kill -9 of one rank inside the collective hits).
TEST_KILL_ENV = "CKPTD_TEST_KILL_DCP"


def _test_fault(run: Run, rank: int, step: int) -> None:
    spec = os.environ.get(TEST_KILL_ENV)
    if spec and run.attempt == 1 and spec == f"{rank}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _commit(run: Run, staging: Path, step: int, metrics: dict[str, Any], blocked_s: float,
            world: int, files: dict[str, Any], ranks: list[list[Any]]) -> dict[str, Any]:
    """Rank 0: write the ckptd manifest of every rank's files, then have the daemon publish."""
    size, digest = sha256_file(staging / METADATA)
    files[METADATA] = {"bytes": size, "sha256": digest}
    fmt.write_durable(staging / fmt.DATA_FILE, b"")  # no tensors of ckptd's own format
    files[fmt.DATA_FILE] = {"bytes": 0, "chunk": fmt.CHUNK, "sha256": [], "crc32": []}
    manifest = {
        "format": fmt.FORMAT, "version": fmt.FORMAT_VERSION, "run": run.id,
        "attempt": run.attempt, "step": step, "metrics": metrics, "created": time.time(),
        # ranks: [rank, node, host] of every rank that wrote a shard
        "blocked_s": blocked_s, "dcp": {"world_size": world, "ranks": ranks},
        "tree": {"D": [["state", None], ["rng", None]]}, "tensors": [], "files": files,
    }
    fmt.write_durable(staging / fmt.MANIFEST_FILE,
                   json.dumps(manifest, separators=(",", ":")).encode())
    fsync_dir(staging)
    return transport.call(run.home, "dcp_commit", {
        "run": run.id, "attempt": run.attempt, "step": step, "staging": staging.name,
        "metrics": metrics, "blocked_s": blocked_s}, autostart=run._autostart, timeout=600)


def verify_files(ckpt_dir: Path, manifest: dict[str, Any], sizes_only: bool = False) -> None:
    """Check every file a DCP step's manifest lists besides ckptd's own data file.

    :raises CheckpointError: a file is missing, has the wrong size or hash.
    """
    for name, info in sorted(manifest.get("files", {}).items()):
        if name == fmt.DATA_FILE:
            continue
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise CheckpointError(f"verify {ckpt_dir}: bad file name {name!r} in the manifest")
        path = ckpt_dir / name
        try:
            if sizes_only:
                size, digest = path.stat().st_size, info.get("sha256")
            else:
                size, digest = sha256_file(path)
        except OSError as exc:
            raise CheckpointError(f"verify {path}: {exc.strerror or exc}") from None
        if size != info.get("bytes"):
            raise CheckpointError(f"verify {path}: {size} bytes, manifest says "
                                  f"{info.get('bytes')} (truncated or damaged)")
        if digest != info.get("sha256"):
            raise CheckpointError(f"verify {path}: sha256 does not match the manifest "
                                  "(file damaged)")


# ----------------------------------------------------------------- restore

def restore(run: Run, into: Any) -> Any:
    """Load the newest verified checkpoint into ``into`` in place; None if there is none.

    Under a process group it is collective (:func:`_restore_collective`):
    rank 0's store is the only one with the committed rows (other nodes'
    stores have none). Without one (a job that came back as one process),
    the rows come from the home's store. A DCP step is loaded with
    ``torch.distributed.checkpoint.load`` (resharding to this world size);
    one written by a single process in ckptd's format is copied in.
    """
    if in_process_group():
        return _restore_collective(run, into)
    root = checkpoint_root(run)
    for row, _ in restoring.candidates(run):
        ckpt_dir = root / fmt.step_dir_name(row["step"])
        try:
            rng_state = _load_one(run, ckpt_dir, row["hash"], into)
        except CheckpointError as exc:
            restoring.skip(run, row["step"], str(exc))
            restoring.report_corrupt(run, row["step"], str(exc))
            continue
        _finish_restore(run, row["step"], rng_state)
        return into
    restoring.announce(run, None)
    return None


def _load_one(run: Run, ckpt_dir: Path, digest: str, into: Any,
              verify: bool = True) -> dict[str, Any] | None:
    """Load one step into ``into``; its RNG state for this rank (or None)."""
    manifest, _ = fmt.read_manifest(ckpt_dir, digest)
    if manifest.get("dcp"):
        if verify:
            verify_files(ckpt_dir, manifest)
        return _load_dcp(ckpt_dir, into, run.rank)
    payload, _ = fmt.load_dir(ckpt_dir, digest)
    copy_into(into, payload["state"], "state")
    return fmt.clone_tensors(payload.get("rng"))


def _finish_restore(run: Run, step: int, rng_state: dict[str, Any] | None) -> None:
    from . import rng

    if rng_state:
        rng.restore(rng_state)  # last: nothing after draws a number
    restoring.announce(run, step)


def _restore_collective(run: Run, into: Any) -> Any:
    """Every rank restores the same step, chosen by rank 0 and verified by all.

    1. rank 0 waits for its daemon's in-flight commits; every rank lists the
       committed steps its node's store has, and all ranks take the union,
       newest first. Usually only rank 0's store has any, but a job started
       again may find rank 0 on another node than last time (c10d assigns
       nodes in the order they join): the rows are then in a member's store.
    2. For each step: every rank reads the manifest and hashes a share of the
       files (file i by rank i mod world: each byte is read once in all), and
       the ranks agree; a step that fails anywhere is skipped everywhere (a
       rank loading another step than its peers would hang DCP's load).
    3. ``dcp.load`` (collective) on every rank; a failure on any rank moves
       all of them to the next step.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine: Any
    try:
        if rank == 0:
            restoring.await_commits(run)
        mine = [(row["step"], row["hash"]) for row, _ in restoring.candidates(run)]
    except (CkptdError, OSError) as exc:
        mine = f"restore: rank {rank}: cannot list the checkpoints of run {run.id}: {exc}"
    listings: list[Any] = [None] * world
    dist.all_gather_object(listings, mine)
    error = next((g for g in listings if isinstance(g, str)), None)
    if error is not None:
        raise CheckpointError(error)
    root = checkpoint_root(run)
    for step, digest in sorted({c for g in listings for c in g}, reverse=True):
        ckpt_dir = root / fmt.step_dir_name(step)
        error = None
        try:
            manifest, _ = fmt.read_manifest(ckpt_dir, digest)
            if manifest.get("dcp"):
                names = sorted(n for n in manifest.get("files", {}) if n != fmt.DATA_FILE)
                share = {n: manifest["files"][n] for i, n in enumerate(names)
                         if i % world == rank}
                verify_files(ckpt_dir, dict(manifest, files=share))
        except CheckpointError as exc:
            error = str(exc)
        error = _one_outcome(dist, error)
        if error is None:
            try:
                rng_state = _load_one(run, ckpt_dir, digest, into, verify=False)
            except CheckpointError as exc:
                error = str(exc)
            error = _one_outcome(dist, error)
        if error is not None:
            restoring.skip(run, step, error)
            if rank == 0:
                restoring.report_corrupt(run, step, error)
            continue
        _finish_restore(run, step, rng_state)
        return into
    restoring.announce(run, None)
    return None


def _load_dcp(ckpt_dir: Path, into: Any, rank: int) -> dict[str, Any] | None:
    import torch
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group: loading without one"
            dcp.load(into, checkpoint_id=os.fspath(ckpt_dir))
    except Exception as exc:  # noqa: BLE001 - a layout that does not match, a bad file
        raise CheckpointError(f"load {ckpt_dir}: torch.distributed.checkpoint.load: "
                              f"{exc}") from None
    path = ckpt_dir / f"{RNG_PREFIX}{rank}.pt"
    if not path.exists():
        return None  # more ranks now than when it was saved: this one starts a new stream
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"load {path}: {exc}") from None


def copy_into(dst: Any, src: Any, where: str) -> None:
    """Copy a loaded state into the user's objects in place (tensors by ``copy_``)."""
    torch = sys.modules.get("torch")
    if isinstance(dst, dict) and isinstance(src, dict):
        for k, v in src.items():
            if k in dst and (isinstance(dst[k], (dict, list))
                             or (torch is not None and isinstance(dst[k], torch.Tensor))):
                copy_into(dst[k], v, f"{where}[{k!r}]")
            else:
                dst[k] = v
    elif isinstance(dst, list) and isinstance(src, (list, tuple)) and len(dst) == len(src):
        for i, v in enumerate(src):
            if isinstance(dst[i], (dict, list)) or (torch is not None
                                                     and isinstance(dst[i], torch.Tensor)):
                copy_into(dst[i], v, f"{where}[{i}]")
            else:
                dst[i] = v
    elif torch is not None and isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor):
        if dst.shape != src.shape:
            raise CheckpointError(f"restore: {where} has shape {tuple(src.shape)} in the "
                                  f"checkpoint, {tuple(dst.shape)} in the target")
        with torch.no_grad():
            dst.copy_(src)
    else:
        raise CheckpointError(f"restore: {where} cannot be loaded in place "
                              f"({type(src).__name__} into {type(dst).__name__})")


__all__ = ["save", "restore", "in_process_group", "verify_files"]
