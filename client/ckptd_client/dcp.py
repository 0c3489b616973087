"""Sharded checkpoints of many ranks, in the ``torch.distributed.checkpoint`` format.

Under an initialized process group ``run.checkpoint(state, step)`` is
collective and asynchronous, like DCP's own ``async_save``: the training loop
waits only for the snapshot, everything else happens in one background thread
per rank, on a gloo process group of ckptd's own (so the checkpoint's
collectives never interleave with the training loop's on the default group).
The order, and the crash window each step closes:

1. Snapshot (the loop waits for this only): DCP's ``DefaultStager`` copies
   every tensor to CPU memory it keeps for the next checkpoint (pinned when
   CUDA is there); the RNG states are captured and serialized.
   The handle is returned; the loop goes on.
2. (background) rank 0 creates ``step-<N>.dcp.ckptd-tmp/`` (a staging name:
   never read, removed at the daemon's next start unless its writer, rank 0
   named in :data:`OWNER_FILE`, still runs); the ranks agree on it.
3. ``dcp.save`` of the snapshot through DCP's ``FileSystemWriter(sync_files=True)``,
   whose file system hashes (sha256) every shard as it is written: every rank
   writes and fsyncs its ``__<rank>_0.distcp``; rank 0 writes ``.metadata``.
   Each rank also writes and fsyncs ``ckptd-rng-<rank>.pt`` (its RNG states,
   ``torch.load(weights_only=True)``-safe).
   CRASH WINDOW: a rank killed here, or in 1-4, leaves a staging directory only.
4. Rank 0 gathers every rank's hashes (a collective: it returns only when
   every rank's shard is durable), hashes ``.metadata``, writes
   ``manifest.json`` (every file with its size and hash) and fsyncs it and
   the directory.
5. rank 0 asks the daemon (``dcp_commit``) to check sizes, fsync again, and
   publish: rename to ``step-<N>/``, fsync the parent, commit the row (the
   same ordered protocol as one process's checkpoint, ``ckptd.checkpoints``).
6. rank 0 tells every rank the outcome; each resolves its handle.

Unlike one process's checkpoint (SPEC promise 3), a snapshot taken is not
committed if a rank dies before 5: the step is visible only once every rank's
shard is durable, so a rank killed mid-checkpoint leaves no step at all.
One checkpoint is in flight at a time: the next ``checkpoint()`` waits for
the previous one (outside its blocked time), ``restore()`` and ``finish()``
wait for it too.

Several nodes: the step directories live in a directory every node shares
(``init(checkpoint_dir=D)`` / ``CKPTD_CHECKPOINT_DIR``): ``D/<run-id>/``
(:func:`checkpoint_root`); rank 0's daemon links its home's checkpoints
there (``ckptd.daemon.shared_dir``) and is the only one to commit (step 5).
Each rank's writer fsyncs and hashes its own shard on its own node (step 3).
A rank that does not see the staging directory rank 0 created says the
directory is not shared, and the step fails on every rank.

The step directory is a plain DCP checkpoint: ``torch.distributed.checkpoint.load``
reads it without ckptd (it ignores ``manifest.json``, ``tensors.bin`` and
the RNG files).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
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
#: In a DCP staging directory: which process (rank 0) writes it. The ranks,
#: not the daemon, write a DCP step, and they outlive a daemon: a daemon that
#: (re)starts meanwhile (auto-started by this very commit) keeps a staging
#: directory whose writer lives. The daemon removes it when it takes the step
#: over (``dcp_commit``), before publishing.
OWNER_FILE = "ckptd-writer.json"


def write_owner(staging: Path) -> None:
    """Name this process as the writer of ``staging`` (see :data:`OWNER_FILE`)."""
    from .identity import boot_id, process_start_time

    (staging / OWNER_FILE).write_text(json.dumps({
        "pid": os.getpid(), "started": process_start_time(), "boot": boot_id(),
        "host": socket.gethostname()}))


def read_owner(staging: Path) -> dict[str, Any] | None:
    """The writer :func:`write_owner` named, or None (none, or unreadable)."""
    try:
        owner = json.loads((staging / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


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


def _sha256_file(path: Path) -> tuple[int, str]:
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


def _one_outcome(dist: Any, error: str | None, group: Any = None) -> str | None:
    """Every rank learns whether any rank failed (the first error wins)."""
    errors: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    return next((e for e in errors if e), None)


class _HashingStream:
    """A shard file that hashes what it is given as it writes it (the format's
    per-chunk blake3, piece by piece while it is in the CPU cache), so no
    second pass reads the shard back: the hash is of the bytes the fsync
    makes durable. Writeback of each finished chunk is started at once, as
    the daemon's own writer does, so DCP's fsync waits only for the tail."""

    def __init__(self, f: Any, fault: Callable[[], None] | None) -> None:
        self._f, self._h, self.size, self._fault = f, fmt.ChunkHasher(), 0, fault
        self._started = 0  # bytes whose writeback was started

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        for off in range(0, view.nbytes, fmt.PIECE):
            piece = view[off:off + fmt.PIECE]
            self._h.update(piece)
            if self._f.write(piece) != piece.nbytes:
                raise OSError(f"short write to {self._f.name}")
        self.size += view.nbytes
        if self.size - self._started >= fmt.CHUNK:
            self._f.flush()
            fmt.start_writeback(self._f.fileno(), self._started, self.size - self._started)
            self._started = self.size
        if self._fault is not None:  # test-only: dies here, a shard half written
            self._fault()
        return view.nbytes

    def entry(self) -> dict[str, Any]:
        """The manifest entry, as :func:`format.hash_file` makes it."""
        return {"bytes": self.size, "chunk": fmt.CHUNK, fmt.HASH_ALGO: self._h.digests()}

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close, writable
        return getattr(self._f, name)


def _hashing_writer(staging: Path, fault: Callable[[], None] | None) -> Any:
    """DCP's own ``FileSystemWriter`` (fsync per file), on a file system that
    hashes every ``.distcp`` shard while it is written (``writer.digests``)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    digests: dict[str, dict[str, Any]] = {}

    class HashingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
            name = Path(path).name
            if mode != "wb" or not name.endswith(".distcp"):
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with open(path, "wb") as f:
                stream = _HashingStream(f, fault)
                yield stream
            digests[name] = stream.entry()

    writer = FileSystemWriter(staging, single_file_per_rank=True, sync_files=True,
                              thread_count=1)
    writer.fs = HashingFileSystem()
    writer.digests = digests
    return writer


class DcpSaver:
    """The collective checkpoints of one run in one rank: the snapshot stager
    (its CPU copies are reused by the next checkpoint), ckptd's own gloo
    group, and the one checkpoint in flight."""

    #: How long a new checkpoint waits for the previous one to be committed.
    previous_timeout = 600.0

    def __init__(self, run: Run) -> None:
        self.run = run
        self._lock = threading.Lock()  # one checkpoint() at a time
        self._group: Any = None
        self._stager: Any = None
        self._last: snapshot.CheckpointHandle | None = None
        #: why this rank's checkpoint group can no longer be used (a collective
        #: failed or timed out: its peers' sequence of collectives is unknown)
        self._broken: str | None = None
        #: set when a checkpoint's collective failed (a peer rank died or hung):
        #: this rank's loop may have run to its end, but the job's attempt did not
        self.peer_failed: str | None = None
        self._closed = False

    def save(self, state: Any, step: int, metrics: dict[str, Any] | None) -> Any:
        import torch
        import torch.distributed as dist

        from . import rng

        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise TypeError(f"checkpoint step must be a non-negative int, not {step!r}")
        if metrics is not None and not isinstance(metrics, dict):
            raise TypeError(f"checkpoint metrics must be a dict, not {type(metrics).__name__}")
        values = {k: protocol.check_metric(k, v) for k, v in (metrics or {}).items()}
        handle = snapshot.CheckpointHandle(step)
        with self._lock:
            if self._closed:
                raise CkptdError("checkpoint: the run is finished")
            last = self._last
            if last is not None and not last._event.wait(self.previous_timeout):
                self._broken = (f"the checkpoint of step {last.step} is still being written "
                                f"after {self.previous_timeout:.0f} s")
            if self._broken:
                # no collective: the other ranks' sequence on the group is unknown
                return self._fail(handle, f"checkpoint step {step}: skipped: {self._broken}")
            t0 = time.perf_counter()
            error = None
            try:
                if self._group is None:
                    # collective on the default group, from the training thread,
                    # at a point every rank reaches together (its first checkpoint)
                    self._group = dist.new_group(backend="gloo")
                    from torch.distributed.checkpoint.staging import (
                        DefaultStager,
                        StagingOptions,
                    )

                    self._stager = DefaultStager(StagingOptions(
                        use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                        use_async_staging=False, use_non_blocking_copy=False))
                staged = self._stager.stage(state)
                buf = io.BytesIO()
                torch.save(rng.capture(), buf)
                rng_bytes = buf.getvalue()
            except Exception as exc:  # noqa: BLE001 - out of memory, an odd state
                if self._group is None:
                    self._broken = f"cannot create the checkpoint process group: {exc}"
                    return self._fail(handle, f"checkpoint step {step}: {self._broken}")
                # the other ranks go on to the background collectives: take part, failing
                staged, rng_bytes = None, b""
                error = f"checkpoint step {step}: rank {dist.get_rank()}: snapshot: {exc}"
            t1 = time.perf_counter()
            handle.blocked_s = handle.timings["snapshot"] = t1 - t0
            self._last = handle
            threading.Thread(target=self._background, name="ckptd-dcp", daemon=True,
                             args=(handle, staged, rng_bytes, error, values, t1)).start()
        return handle

    def wait_idle(self, timeout: float | None) -> None:
        """Wait (bounded) until no checkpoint of this rank is in flight."""
        last = self._last
        if last is not None:
            last._event.wait(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """At finish: wait (bounded) for the checkpoint in flight, so the user's
        ``destroy_process_group()`` after ``finish()`` does not cut it off."""
        with self._lock:
            self._closed = True
        self.wait_idle(timeout if timeout is not None else 30.0)

    def _background(self, handle: snapshot.CheckpointHandle, staged: Any, rng_bytes: bytes,
                    error: str | None, metrics: dict[str, Any], t0: float) -> None:
        try:
            result, error = self._write_and_commit(handle, staged, rng_bytes, error, metrics,
                                                   t0)
        except Exception as exc:  # noqa: BLE001 - a collective failed: a peer died or hung
            self._broken = f"a collective of the checkpoint of step {handle.step} failed: {exc}"
            self.peer_failed = self._broken
            result, error = None, f"checkpoint step {handle.step}: {self._broken}"
        if error is not None:
            self._fail(handle, error)
        else:
            handle._resolve(dict(result or {}, blocked_s=handle.blocked_s,
                                 timings=handle.timings), None)

    def _write_and_commit(self, handle: snapshot.CheckpointHandle, staged: Any,
                          rng_bytes: bytes, error: str | None, metrics: dict[str, Any],
                          t0: float) -> tuple[dict[str, Any] | None, str | None]:
        """Steps 2-6 of the module doc; every rank makes the same collectives,
        in the same order, whatever failed."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        run, group, step = self.run, self._group, handle.step
        timings = handle.timings

        def lap(name: str) -> None:
            nonlocal t0
            timings[name], t0 = time.perf_counter() - t0, time.perf_counter()

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        root = checkpoint_root(run)
        staging = root / (fmt.step_dir_name(step) + DCP_STAGING)
        if rank == 0 and error is None:
            try:
                link_checkpoint_dir(run)
                shutil.rmtree(staging, ignore_errors=True)  # an earlier failed try of this step
                root.mkdir(parents=True, exist_ok=True, mode=0o700)
                staging.mkdir(mode=0o700)
                # CRASH WINDOW (a daemon starting between these two lines): it
                # sees a staging directory without a writer and removes it; the
                # ranks' writes then fail and so does this step, cleanly.
                write_owner(staging)
            except CkptdError as exc:
                error = f"checkpoint step {step}: {exc}"
            except OSError as exc:
                error = f"checkpoint step {step}: cannot create {staging}: {exc.strerror or exc}"
        lap("start")
        error = _one_outcome(dist, error, group)
        if error is None and rank != 0 and not staging.is_dir():
            error = (f"checkpoint step {step}: rank {rank} (node {run.node_rank}) does not see "
                     f"{staging}, which rank 0 created: the checkpoint directory must be shared "
                     "by every node (init(checkpoint_dir=...) / CKPTD_CHECKPOINT_DIR on NFS or "
                     "Lustre, the same path everywhere)")
        error = _one_outcome(dist, error, group)
        lap("agree")
        files: dict[str, Any] = {}
        if error is None:
            writer = _hashing_writer(staging, _test_fault_in_write(run, rank, step))
            try:
                dcp.save(staged, storage_writer=writer, process_group=group)
                files.update(writer.digests)
                name = f"{RNG_PREFIX}{rank}.pt"
                fmt.write_durable(staging / name, rng_bytes)
                hasher = fmt.ChunkHasher()
                hasher.update(rng_bytes)
                files[name] = {"bytes": len(rng_bytes), "chunk": fmt.CHUNK,
                               fmt.HASH_ALGO: hasher.digests()}
            except OSError as exc:
                error = f"checkpoint step {step}: rank {rank}: write shards: " \
                        f"{exc.strerror or exc}"
            except Exception as exc:  # noqa: BLE001 - DCP gathers every rank's failure
                error = f"checkpoint step {step}: torch.distributed.checkpoint.save failed: {exc}"
        del staged
        lap("write")
        _test_fault(run, rank, step)
        gathered: list[Any] = [None] * world
        # CRASH WINDOW: until every rank is past this gather, some shard may not be
        # durable; rank 0 commits nothing before it, so a rank killed here leaves
        # a staging directory only (removed by rank 0's daemon at its next start).
        dist.all_gather_object(gathered, error or {"files": files, "node": run.node_rank,
                                                   "host": socket.gethostname()}, group=group)
        lap("gather")
        error = next((g for g in gathered if isinstance(g, str)), None)
        result: dict[str, Any] | None = None
        if rank == 0 and error is None:
            try:
                result = _commit(run, staging, step, metrics, handle.blocked_s, world,
                                 {k: v for g in gathered for k, v in g["files"].items()},
                                 [[r, g["node"], g["host"]] for r, g in enumerate(gathered)])
            except CkptdError as exc:
                error = str(exc)
            except OSError as exc:
                error = f"checkpoint step {step}: {exc.strerror or exc}"
        lap("commit")
        outcome: list[Any] = [(result, error)]
        dist.broadcast_object_list(outcome, src=0, group=group)
        lap("outcome")
        return outcome[0]

    def _fail(self, handle: snapshot.CheckpointHandle, error: str) -> Any:
        """Say why, keep training: the handle carries the error."""
        self.run._warn("ckpt-dcp", error)
        handle._resolve(None, CheckpointError(error))
        return handle


def saver_for(run: Run) -> DcpSaver:
    if run._dcp_saver is None:
        run._dcp_saver = DcpSaver(run)
    return run._dcp_saver


def save(run: Run, state: Any, step: int, metrics: dict[str, Any] | None) -> Any:
    """Collective, asynchronous checkpoint of every rank's ``state`` (see the module doc)."""
    return saver_for(run).save(state, step, metrics)


#: Test-only fault injection: ``<rank>:<step>`` SIGKILLs that rank in attempt 1's
#: checkpoint of that step, after its shard is durable and before the ranks
#: agree (the instant a kill -9 of one rank inside the collective hits);
#: ``<rank>:<step>:write`` SIGKILLs it while its shard is being written in the
#: background, once the training loop has logged a later step (and flushed
#: it), which shows that the loop ran on.
TEST_KILL_ENV = "CKPTD_TEST_KILL_DCP"


def _test_fault(run: Run, rank: int, step: int) -> None:
    spec = os.environ.get(TEST_KILL_ENV)
    if spec and run.attempt == 1 and spec == f"{rank}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _test_fault_in_write(run: Run, rank: int, step: int) -> Callable[[], None] | None:
    """For ``<rank>:<step>:write``: what the shard writer calls after its first
    write: wait until the loop logged a later step, flush it, SIGKILL."""
    if os.environ.get(TEST_KILL_ENV) != f"{rank}:{step}:write" or run.attempt != 1:
        return None

    def kill() -> None:
        import signal

        deadline = time.monotonic() + 60
        while run._step <= step and time.monotonic() < deadline:
            time.sleep(0.01)
        with contextlib.suppress(CkptdError):
            run.flush(timeout=10)
        os.kill(os.getpid(), signal.SIGKILL)

    return kill


def _commit(run: Run, staging: Path, step: int, metrics: dict[str, Any], blocked_s: float,
            world: int, files: dict[str, Any], ranks: list[list[Any]]) -> dict[str, Any]:
    """Rank 0: write the ckptd manifest of every rank's files, then have the daemon publish."""
    files[METADATA] = fmt.hash_file(staging / METADATA)
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
    """Check every file a DCP step's manifest lists besides ckptd's own data file:
    entries as :func:`format.hash_file` makes them (per-chunk blake3), or, for
    steps written before, one whole-file sha256.

    :raises CheckpointError: a file is missing, has the wrong size or hash.
    """
    for name, info in sorted(manifest.get("files", {}).items()):
        if name == fmt.DATA_FILE:
            continue
        if not isinstance(name, str) or "/" in name or name in ("", ".", "..") \
                or not isinstance(info, dict):
            raise CheckpointError(f"verify {ckpt_dir}: bad file name {name!r} in the manifest")
        path = ckpt_dir / name
        if not sizes_only and not isinstance(info.get("sha256"), str):
            fmt.verify_files(ckpt_dir, {name: info})
            continue
        try:
            size, digest = (path.stat().st_size, None) if sizes_only else _sha256_file(path)
        except OSError as exc:
            raise CheckpointError(f"verify {path}: {exc.strerror or exc}") from None
        if size != info.get("bytes"):
            raise CheckpointError(f"verify {path}: {size} bytes, manifest says "
                                  f"{info.get('bytes')} (truncated or damaged)")
        if digest is not None and digest != info.get("sha256"):
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
    if run._dcp_saver is not None:  # this process's own checkpoint in flight comes first
        run._dcp_saver.wait_idle(DcpSaver.previous_timeout)
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


__all__ = ["DcpSaver", "save", "restore", "in_process_group", "verify_files"]
