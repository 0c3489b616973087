"""Checkpoints, training side: snapshot into shared memory, hand over, restore.

How a checkpoint travels (SPEC promises 2, 3 and 4)::

    trainer                                   daemon
    -------                                   ------
    walk state -> tree + tensor list
    copy tensors into a memfd buffer      (the only time the loop is blocked)
    send CKPT {tree, layout} + the fd ----> check the fd, copy it to a
    checkpoint() returns a handle            staging dir, fsync, hash, rename,
                                             insert the row, then reply
    handle resolves  <--------------------- CKPT_DONE {ok, hash, persist_s}

The buffer is an anonymous memory file (``memfd_create``) whose descriptor
travels with the message (SCM_RIGHTS): it has no name, so no other user can
plant, open or read it (named /dev/shm files could be pre-created by anyone).
Once ``checkpoint()`` returns, the message and the descriptor are in the
kernel's socket buffer, so the daemon has everything it needs even if the
trainer is killed at that instant. The buffer is one per training process,
reused by every checkpoint (and grown when the state grows); the kernel
frees it when the trainer and the daemon have both closed it, so nothing
is left behind by a dead trainer.

On disk a checkpoint is a directory ``step-<N>/`` holding:

* ``tensors.bin``: every tensor's raw bytes, at 64-byte-aligned offsets;
* ``manifest.json``: the nested structure (dicts, lists, tuples, plain
  values inline, tensors by index; tensors sharing one view, e.g. tied
  embeddings, once), each tensor's dtype/shape/offset, and per 64 MiB chunk
  of ``tensors.bin`` a blake3 and an xxh3-128, both computed by the daemon in
  the pass that writes the file. The store's row holds the sha256 of the
  manifest itself, so one value pins the whole checkpoint.

Verification: ``ckptd ckpt verify``, the daemon's start-up reconcile and
``export`` check every chunk's blake3 (cryptographic: any flipped, torn or
truncated byte fails, and nobody can make damage that keeps it). ``restore()``
checks every chunk's xxh3-128 (~30 GB/s a core: it catches every accidental
flip, tear or truncation with the same 2**-128 odds, at a cost that vanishes
next to the copy into the model; blake3 at ~7 GB/s made restore 1.7x
``torch.load(mmap=True)`` on 2 cores). ``restore(into=...)`` checks each piece
right before copying it into the model. Without the ``xxhash`` package, or
for a manifest that records no xxh3-128 (written before it), restore checks
blake3; checkpoints from before blake3 record sha256 (verify) and crc32
(restore) and are checked with those.

Nothing is pickled: loading runs no code, and ``ckptd ckpt export`` turns a
checkpoint into one plain ``torch.save`` file (``weights_only=True``-safe).

This module is also the reader the daemon uses (format, hashing,
verification), so the two sides can never disagree about the format. It
imports only the standard library at import time; torch is imported when a
checkpoint is taken or loaded.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import mmap
import os
import sqlite3
import sys
import threading
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import paths
from ..errors import CheckpointError, CkptdError

if TYPE_CHECKING:
    pass


# ------------------------------------------------------------------ format

FORMAT = "ckptd-checkpoint"
FORMAT_VERSION = 1
DATA_FILE = "tensors.bin"
MANIFEST_FILE = "manifest.json"
STEP_PREFIX = "step-"
#: A directory being written; never read, removed at daemon start.
STAGING_SUFFIX = ".ckptd-tmp"
#: A committed step moved aside while a new checkpoint of the same step replaces it.
REPLACED_SUFFIX = ".ckptd-old"
#: The daemon's record of the step it is publishing (its manifest hash), written
#: before the rename and removed once the row is in: at start, a ``step-<N>/``
#: without a row is adopted only if such a record names exactly its manifest.
INTENT_SUFFIX = ".ckptd-commit"
#: Tensor offsets are aligned so every dtype can be viewed in place.
ALIGN = 64
#: Unit of hashing: chunks are hashed in parallel on write and on verify.
CHUNK = 64 << 20
#: Chunk hash of the data file in new checkpoints (see :data:`CHECKS`).
HASH_ALGO = "blake3"
#: Hash of the manifest file (the store row's ``hash``, ``sha256:<hex>``).
MANIFEST_HASH = "sha256"
#: Unit in which bytes are moved and hashed together (fits in L2).
PIECE = 1 << 20
MAX_MANIFEST = 256 << 20
#: Reply from the daemon to a CKPT message: {id, ok, error?, kind?, hash?, bytes?, persist_s?}.
CKPT_DONE = "ckpt_done"
#: Name of the snapshot memfd (shown in /proc/<pid>/fd; names nothing on disk).
BUFFER_NAME = "ckptd-snapshot"
#: Longest a checkpoint request may wait for room in the daemon's socket.
SEND_TIMEOUT_S = 30

#: dtype name -> element size. The daemon checks layouts against this
#: without importing torch.
DTYPE_SIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
}


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def parse_step_dir(name: str) -> int | None:
    """The step of a committed checkpoint directory name, else None."""
    if not name.startswith(STEP_PREFIX):
        return None
    digits = name[len(STEP_PREFIX):]
    return int(digits) if digits.isdigit() else None


def content_hash(data: bytes) -> str:
    """The manifest's hash (the store's row): sha256, small input, never the bottleneck."""
    return f"{MANIFEST_HASH}:{hashlib.sha256(data).hexdigest()}"


def _blake3() -> Any:
    import blake3  # imported on first use: the client imports only the stdlib at import time

    return blake3.blake3()


def _xxh3_128() -> Any:
    import xxhash  # imported on first use, like blake3; absent: see available()

    return xxhash.xxh3_128()


def available(algo: str) -> bool:
    """Whether this process can compute ``algo`` (a check's package may be missing:
    the client side has no hard dependencies, and restore then falls back)."""
    try:
        CHECKS[algo]()
    except ImportError:
        return False
    return True


class _Crc32:
    """zlib.crc32 behind the hashlib interface (incremental update, hexdigest)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)  # releases the GIL on large buffers

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


#: Chunk checks a manifest may record for its data file, by the name it
#: records them under (the manifest's algorithm field). New checkpoints
#: record blake3 (cryptographic, so ``ckpt verify`` catches any flipped, torn
#: or truncated byte, ~7 GB/s a core) and xxh3_128 (restore's check, ~30 GB/s
#: a core), both computed in the one pass that writes the data. Checkpoints
#: written before recorded blake3 only, or sha256 (the full check) and crc32
#: (restore's check): they still verify with those.
CHECKS: dict[str, Callable[[], Any]] = {
    "blake3": _blake3, "xxh3_128": _xxh3_128, "sha256": hashlib.sha256, "crc32": _Crc32}
#: Checks the daemon records for every new checkpoint (those it can compute).
WRITE_CHECKS = ("blake3", "xxh3_128")
#: Full verification (``ckpt verify``, reconcile, export): the first of these the manifest has.
FULL = ("blake3", "sha256")
#: Restore's check: the first of these the manifest has and this process can compute.
FAST = ("xxh3_128", "blake3", "crc32")


def pick_check(info: dict[str, Any], prefer: tuple[str, ...]) -> str:
    """The algorithm to check ``info`` (a manifest's file entry) with.

    :raises CheckpointError: it records none of ``prefer``.
    """
    for algo in prefer:
        if isinstance(info.get(algo), list) and available(algo):
            return algo
    raise CheckpointError(f"the manifest records none of {', '.join(prefer)} "
                          "that this process can compute")


def _digest(algo: str, view: memoryview) -> str:
    h = CHECKS[algo]()
    h.update(view)
    return h.hexdigest()


class ChunkHasher:
    """Per-CHUNK digests of a byte stream fed in pieces of any size, for one or
    more algorithms at once.

    Why streaming: whoever moves the bytes (the daemon writing a checkpoint,
    restore copying into the model, a file read) hashes each piece while it
    is in the CPU cache, so the data crosses memory once.
    """

    def __init__(self, algo: str | tuple[str, ...] = HASH_ALGO, chunk: int = CHUNK) -> None:
        self.algos = (algo,) if isinstance(algo, str) else algo
        self.chunk = chunk
        self._news = [CHECKS[a] for a in self.algos]
        self._cur = [new() for new in self._news]
        self._left = chunk
        self.done: dict[str, list[str]] = {a: [] for a in self.algos}

    def update(self, view: Any) -> None:
        view = memoryview(view).cast("B")
        while len(view):
            n = min(self._left, len(view))
            part = view[:n]
            for h in self._cur:
                h.update(part)
            view = view[n:]
            self._left -= n
            if self._left == 0:
                self._close_chunk()

    def _close_chunk(self) -> None:
        for a, h in zip(self.algos, self._cur, strict=True):
            self.done[a].append(h.hexdigest())
        self._cur, self._left = [new() for new in self._news], self.chunk

    def all_digests(self) -> dict[str, list[str]]:
        """Every algorithm's chunk digests (the last chunk partial); call once, at the end."""
        if self._left != self.chunk:
            self._close_chunk()
        return self.done

    def digests(self) -> list[str]:
        """The first algorithm's chunk digests; call once, at the end."""
        return self.all_digests()[self.algos[0]]


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for hashing chunks: every check releases the GIL, so chunks hash in parallel."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="ckptd-hash")
        return _pool


def submit_chunk_hashes(buf: Any, size: int, algo: str = HASH_ALGO,
                        pool: concurrent.futures.Executor | None = None) -> \
        list[concurrent.futures.Future[str]]:
    """Start checking ``buf[:size]`` in CHUNK pieces; the futures give hex digests in order."""
    view = memoryview(buf).cast("B")
    pool = pool or hash_pool()
    return [pool.submit(_digest, algo, view[off:min(off + CHUNK, size)])
            for off in range(0, size, CHUNK)]


def chunk_hashes(buf: Any, size: int, algo: str = HASH_ALGO) -> list[str]:
    return [f.result() for f in submit_chunk_hashes(buf, size, algo)]


def _libc_sync_file_range() -> Callable[..., int] | None:
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):
        return None


_sync_file_range: Any = None  # resolved on first use: nothing but the stdlib at import
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, off: int, n: int) -> None:
    """Ask the kernel to start writing ``[off, off+n)`` now, so the disk works
    while the writer still hashes and copies, and the final fsync waits only
    for the tail (does not wait, promises nothing: durability is the fsync's)."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = _libc_sync_file_range() or False
    if _sync_file_range:
        _sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE)


def hash_file(path: Path, algo: str = HASH_ALGO) -> dict[str, Any]:
    """The manifest entry of one file: ``{"bytes", "chunk", algo: [digest per chunk]}``.

    For files ckptd did not write itself (adopted checkpoints): read once, in
    pieces, hashed as read.
    """
    hasher = ChunkHasher(algo)
    size = 0
    buf = bytearray(PIECE)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # never a planted link
    with open(fd, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(memoryview(buf)[:n])
            size += n
    return {"bytes": size, "chunk": CHUNK, algo: hasher.digests()}


def hash_dir(d: Path, algo: str = HASH_ALGO) -> dict[str, dict[str, Any]]:
    """Manifest entries of every regular file under ``d`` (by relative path), for
    :func:`verify_files`."""
    return {os.fspath(p.relative_to(d)): hash_file(p, algo)
            for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}


def verify_files(d: Path, files: dict[str, dict[str, Any]],
                 prefer: tuple[str, ...] = FULL) -> None:
    """Check every file of ``files`` (entries as :func:`hash_dir` makes them) under ``d``.

    :raises CheckpointError: a file missing, of the wrong size, or with a chunk
        that fails its hash.
    """
    for name, info in files.items():
        path = d / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise CheckpointError(f"verify {d}: file name {name!r} leaves the directory")
        algo = _pick(path, info, prefer)
        try:
            got = hash_file(path, algo)
        except OSError as exc:
            raise CheckpointError(f"read {path}: {exc.strerror or exc}") from None
        _compare(path, got["bytes"], info.get("bytes"), got[algo], info[algo], algo)


def _compare(path: Path, size: int, want_size: Any, got: list[str], want: list[str],
             algo: str) -> None:
    if size != want_size:
        raise CheckpointError(f"verify {path}: {size} bytes, manifest says {want_size} "
                              "(truncated or damaged)")
    if len(got) != len(want):
        raise CheckpointError(f"verify {path}: {len(got)} chunks, manifest lists {len(want)}")
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a != b:
            raise CheckpointError(f"verify {path}: chunk {i} (bytes {i * CHUNK}-"
                                  f"{min((i + 1) * CHUNK, size)}) fails its {algo} "
                                  "hash (file damaged)")


# ---------------------------------------------------------- state <-> tree

_SCALARS = (str, int, float, bool, type(None))


def encode_payload(state: Any, rng_state: dict[str, Any]) -> tuple[Any, list[tuple[str, Any]]]:
    """The tree of a checkpoint: ``{"state": state, "rng": rng_state}``, plus
    the tensors it holds, in order.

    Tree nodes: plain JSON values inline; ``{"T": i}`` tensor i; ``{"D":
    [[key, node], ...]}`` dict (keys may be ints: optimizer state is keyed
    by parameter index); ``{"L": [...]}`` list; ``{"U": [...]}`` tuple.

    :raises TypeError: naming the path (from the user's ``state`` down) of
        the first value that is not a tensor, number, string, None, dict,
        list or tuple.
    """
    tensors: list[tuple[str, Any]] = []
    seen: dict[tuple[Any, ...], int] = {}
    tree = {"D": [["state", _encode(state, "state", tensors, 0, seen)],
                  ["rng", _encode(rng_state, "rng", tensors, 0, seen)]]}
    return tree, tensors


def _same_view_key(t: Any) -> tuple[Any, ...]:
    """Equal for tensors that are the same view of the same storage (tied weights:
    ``state_dict()`` gives each name its own tensor object over one storage)."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            t.stride(), t.dtype)


def _encode(obj: Any, path: str, tensors: list[tuple[str, Any]], depth: int,
            seen: dict[tuple[Any, ...], int] | None = None) -> Any:
    if depth > 200:
        raise TypeError(f"{path} is nested more than 200 levels deep (a reference cycle?)")
    if isinstance(obj, _SCALARS):
        return obj
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        _check_tensor(obj, path)
        key = _same_view_key(obj) if seen is not None and obj.numel() else None
        if key is not None and key in seen:
            return {"T": seen[key]}  # stored once; decode gives both paths one tensor
        tensors.append((path, obj))
        if key is not None:
            seen[key] = len(tensors) - 1
        return {"T": len(tensors) - 1}
    if isinstance(obj, dict):
        items = []
        for key, value in obj.items():
            if not isinstance(key, _SCALARS):
                raise TypeError(f"{path} has a key {key!r} of type {type(key).__qualname__}; "
                                "checkpoint dict keys must be str, int, float, bool or None")
            items.append([key, _encode(value, f"{path}[{key!r}]", tensors, depth + 1, seen)])
        return {"D": items}
    if isinstance(obj, (list, tuple)):
        nodes = [_encode(v, f"{path}[{i}]", tensors, depth + 1, seen)
                 for i, v in enumerate(obj)]
        return {"L": nodes} if isinstance(obj, list) else {"U": nodes}
    if type(obj).__module__ == "numpy" and getattr(obj, "ndim", None) == 0:
        return obj.item()  # numpy scalar -> plain number: no numpy object is ever stored
    raise TypeError(
        f"{path} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds "
        "tensors, numbers, strings, None and dicts/lists/tuples of them "
        "(convert numpy arrays with torch.from_numpy, objects with .state_dict())"
    )


def _check_tensor(t: Any, path: str) -> None:
    import torch

    if t.layout != torch.strided or t.is_quantized or getattr(t, "is_nested", False):
        raise TypeError(f"{path} is a {t.layout} tensor; only dense tensors can be checkpointed "
                        "(convert with .to_dense() / .dequantize())")
    if t.device.type == "meta":
        raise TypeError(f"{path} is a meta tensor: it has no data to checkpoint")
    if str(t.dtype).removeprefix("torch.") not in DTYPE_SIZES:
        raise TypeError(f"{path} has dtype {t.dtype}, which ckptd cannot store")


def decode_tree(node: Any, tensors: list[Any]) -> Any:
    """Inverse of :func:`encode_payload` (tree from a manifest: untrusted input)."""
    if isinstance(node, dict):
        if "T" in node:
            i = node["T"]
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(tensors):
                raise ValueError(f"tensor index {i!r} out of range")
            return tensors[i]
        if "D" in node:
            return {k: decode_tree(v, tensors) for k, v in node["D"]}
        if "L" in node:
            return [decode_tree(v, tensors) for v in node["L"]]
        if "U" in node:
            return tuple(decode_tree(v, tensors) for v in node["U"])
        raise ValueError(f"unknown tree node {sorted(node)!r}")
    if isinstance(node, list):
        raise ValueError("bare list in tree")
    return node


def layout(tensors: list[tuple[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Offsets for each tensor in the data file; returns (specs, total bytes)."""
    specs: list[dict[str, Any]] = []
    off = 0
    for _, t in tensors:
        dtype = str(t.dtype).removeprefix("torch.")
        nbytes = t.numel() * DTYPE_SIZES[dtype]
        specs.append({"dtype": dtype, "shape": list(t.shape), "offset": off, "nbytes": nbytes})
        off += -(-nbytes // ALIGN) * ALIGN
    return specs, off


def check_specs(specs: Any, size: int) -> None:
    """Validate a tensor layout from an untrusted peer or file.

    :raises ValueError: a spec that does not fit ``size`` bytes or lies about its size.
    """
    if not isinstance(specs, list):
        raise ValueError("tensors must be a list")
    for i, s in enumerate(specs):
        if not isinstance(s, dict) or s.get("dtype") not in DTYPE_SIZES:
            raise ValueError(f"tensor {i}: unknown dtype")
        shape, off, nbytes = s.get("shape"), s.get("offset"), s.get("nbytes")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"tensor {i}: bad shape")
        n = DTYPE_SIZES[s["dtype"]]
        for d in shape:
            n *= d
        if not (isinstance(off, int) and isinstance(nbytes, int)) or nbytes != n \
                or off < 0 or off % ALIGN or off + nbytes > size:
            raise ValueError(f"tensor {i}: offset/size outside the data")


def _tensor_views(base: Any, specs: list[dict[str, Any]]) -> list[Any]:
    """Tensors viewing ``base`` (a uint8 tensor) at the layout's offsets, no copy."""
    import torch

    out = []
    for s in specs:
        raw = base[s["offset"]:s["offset"] + s["nbytes"]]
        out.append(raw.view(getattr(torch, s["dtype"])).view(s["shape"]))
    return out


# ---------------------------------------------------------------- reading

def read_manifest(ckpt_dir: Path, expected_hash: str | None = None) -> tuple[dict[str, Any], str]:
    """Parse and check a manifest; returns (manifest, its content hash).

    :raises CheckpointError: missing, unreadable, not a ckptd manifest, or
        not the manifest the store recorded (``expected_hash``).
    """
    path = ckpt_dir / MANIFEST_FILE
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST + 1)
    except OSError as exc:
        raise CheckpointError(f"read {path}: {exc.strerror or exc}") from None
    digest = content_hash(data)
    if expected_hash is not None and digest != expected_hash:
        raise CheckpointError(f"verify {path}: hash {digest[:19]}... does not match the "
                              f"recorded {str(expected_hash)[:19]}... (file changed or damaged)")
    try:
        manifest = json.loads(data)
        if manifest.get("format") != FORMAT:
            raise ValueError("not a ckptd checkpoint manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {manifest.get('version')!r} is not supported")
        info = manifest["files"][DATA_FILE]
        if not isinstance(info.get("bytes"), int) or not all(
                isinstance(info[algo], list) for algo in CHECKS if algo in info) or not any(
                algo in info for algo in FULL):
            raise ValueError("data file entry is malformed")
        check_specs(manifest["tensors"], info["bytes"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"verify {path}: {exc}") from None
    return manifest, digest


def open_data(ckpt_dir: Path, manifest: dict[str, Any], *,
              verify: tuple[str, ...] | None = FULL, writable: bool = True) -> Any:
    """Map ``tensors.bin`` (private copy-on-write: the file is never changed) and
    check every chunk with the first algorithm of ``verify`` the manifest
    records (None: sizes only). Returns the mmap (None for an empty file).

    :raises CheckpointError: file missing, wrong size, or a chunk that fails its hash.
    """
    path = ckpt_dir / DATA_FILE
    info = manifest["files"][DATA_FILE]
    size = info["bytes"]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise CheckpointError(f"read {path}: {exc.strerror or exc}") from None
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise CheckpointError(f"verify {path}: {actual} bytes, manifest says {size} "
                                  "(truncated or damaged)")
        if size == 0:
            mm = None
        else:
            # No MAP_POPULATE nor MADV_POPULATE_READ: the first copies every
            # page of a writable private mapping, and the second measured
            # 0.04 s/GiB slower than letting the checking threads fault the
            # pages in (each fault maps a whole folio of the page cache):
            # verify 0.084 -> 0.041 s/GiB (/work/scripts/rprof.py, issue 11).
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=prot)
    finally:
        os.close(fd)
    if verify:
        algo = _pick(path, info, verify)
        got = chunk_hashes(mm, size, algo) if mm is not None else []
        _compare(path, size, size, got, info[algo], algo)
    return mm


def _pick(path: Path, info: dict[str, Any], prefer: tuple[str, ...]) -> str:
    try:
        return pick_check(info, prefer)
    except CheckpointError as exc:
        raise CheckpointError(f"verify {path}: {exc}") from None


def verify_dir(ckpt_dir: Path, expected_hash: str | None = None) -> tuple[dict[str, Any], str]:
    """Full check of one checkpoint directory (manifest and every data chunk).

    :raises CheckpointError: saying what failed.
    """
    manifest, digest = read_manifest(ckpt_dir, expected_hash)
    mm = open_data(ckpt_dir, manifest, verify=FULL, writable=False)
    if mm is not None:
        mm.close()
    verify_extra_files(ckpt_dir, manifest)
    return manifest, digest


def verify_extra_files(ckpt_dir: Path, manifest: dict[str, Any],
                       sizes_only: bool = False) -> None:
    """Check the files a manifest lists beside ckptd's own data file: a DCP
    step's shards, or an adopted checkpoint's files (written by a framework,
    hashed at adoption). Without this a flipped byte in them would verify.

    :raises CheckpointError: naming the damaged file.
    """
    if manifest.get("dcp"):  # a sharded step: its DCP files are listed with their hashes
        from ..dcp import verify_files

        verify_files(ckpt_dir, manifest, sizes_only=sizes_only)
    if manifest.get("adopted"):
        from ..integrations.adopt import verify_adopted

        verify_adopted(ckpt_dir, manifest["adopted"], sizes_only=sizes_only)


def load_dir(ckpt_dir: Path, expected_hash: str | None = None, map_location: Any = None,
             verify: tuple[str, ...] | None = FAST,
             into: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint directory: returns (payload, manifest), payload being
    ``{"state": ..., "rng": ...}`` with tensors viewing a private mapping of
    the data file (no read copy; writes to them never reach the file).

    ``verify`` picks the chunk check (see :data:`CHECKS`); restore uses
    :data:`FAST`, ``export`` :data:`FULL`.

    ``into``: a state shaped like the checkpointed one (e.g. ``{"model":
    model.state_dict(), ...}``); each checkpointed tensor is copied into the
    tensor at the same path, in pieces, each piece hashed right before it is
    copied (one read of the file, no intermediate copy), and the payload's
    state holds those tensors. If a chunk fails its check, tensors of
    ``into`` may already hold part of this checkpoint.

    :raises CheckpointError: the checkpoint fails verification or is malformed.
    :raises ValueError: ``into`` does not match the checkpoint (the caller's error).
    """
    manifest, _ = read_manifest(ckpt_dir, expected_hash)
    fused = into is not None and verify
    mm = open_data(ckpt_dir, manifest, verify=None if fused else verify)
    tensors: list[Any] = []
    if manifest["tensors"]:  # torch only when there are tensors
        import torch

        if mm is None:
            base = torch.empty(0, dtype=torch.uint8)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = torch.frombuffer(mm, dtype=torch.uint8)
        tensors = _tensor_views(base, manifest["tensors"])
        if map_location is not None and into is None:
            tensors = [t.to(map_location) for t in tensors]
    try:
        payload = decode_tree(manifest["tree"], tensors)
        if not isinstance(payload, dict) or "state" not in payload:
            raise ValueError("tree has no state")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"load {ckpt_dir / MANIFEST_FILE}: malformed tree: {exc}") from None
    if into is not None:
        dsts: dict[int, list[Any]] = {}
        _pair(manifest["tree"]["D"][0][1], into, "state", dsts, tensors)
        info = manifest["files"][DATA_FILE]
        algo = _pick(ckpt_dir / DATA_FILE, info, verify) if verify else None
        _copy_verified(ckpt_dir / DATA_FILE, mm, info, algo, manifest["tensors"], tensors, dsts)
        payload["state"] = _substitute(manifest["tree"]["D"][0][1], into)
    return payload, manifest


def _pair(node: Any, into: Any, path: str, dsts: dict[int, list[Any]],
          tensors: list[Any]) -> None:
    """Find, for every tensor of the checkpoint tree, the tensor of ``into`` at its path."""
    if isinstance(node, dict) and "T" in node:
        src = tensors[node["T"]]
        if not hasattr(into, "copy_") or not hasattr(into, "shape"):
            raise ValueError(f"restore(into=...): {path} is a tensor in the checkpoint but "
                             f"a {type(into).__name__} in into")
        if tuple(into.shape) != tuple(src.shape):
            raise ValueError(f"restore(into=...): {path} has shape {tuple(into.shape)}, the "
                             f"checkpoint's has {tuple(src.shape)}")
        dsts.setdefault(node["T"], []).append(into)
    elif isinstance(node, dict) and "D" in node:
        if not isinstance(into, dict):
            raise ValueError(f"restore(into=...): {path} is a dict in the checkpoint")
        for k, v in node["D"]:
            if k in into:
                _pair(v, into[k], f"{path}[{k!r}]", dsts, tensors)
    elif isinstance(node, dict) and ("L" in node or "U" in node):
        items = node.get("L", node.get("U"))
        if not isinstance(into, (list, tuple)) or len(into) != len(items):
            raise ValueError(f"restore(into=...): {path} is a list of {len(items)} in the "
                             "checkpoint")
        for i, v in enumerate(items):
            _pair(v, into[i], f"{path}[{i}]", dsts, tensors)


def _substitute(node: Any, into: Any) -> Any:
    """The checkpoint's state with each tensor replaced by the ``into`` tensor it filled
    (values only the checkpoint has are kept from it)."""
    if isinstance(node, dict) and "T" in node:
        return into
    if isinstance(node, dict) and "D" in node:
        return {k: _substitute(v, into[k]) if isinstance(into, dict) and k in into
                else _substitute(v, _MISSING) for k, v in node["D"]}
    if isinstance(node, dict) and ("L" in node or "U" in node):
        items = [_substitute(v, into[i] if into is not _MISSING else _MISSING)
                 for i, v in enumerate(node.get("L", node.get("U")))]
        return items if "L" in node else tuple(items)
    return node


_MISSING: Any = object()


def _copy_verified(path: Path, mm: Any, info: dict[str, Any], algo: str | None,
                   specs: list[dict[str, Any]], srcs: list[Any],
                   dsts: dict[int, list[Any]]) -> None:
    """Copy each mapped tensor into its destinations, hashing every PIECE of the
    file just before copying it (so the copy reads it from the CPU cache).
    Chunks go in parallel (hash and memmove release the GIL). Destinations
    that cannot take raw bytes (another device, dtype or layout) are copied
    whole once every chunk verified.

    :raises CheckpointError: a chunk fails its check.
    """
    import ctypes

    size = info["bytes"]
    want = info[algo] if algo else None
    if want is not None and len(want) != -(-size // CHUNK):
        raise CheckpointError(f"verify {path}: {-(-size // CHUNK)} chunks, manifest lists "
                              f"{len(want)}")
    spans: list[tuple[int, int, int, int]] = []  # (start, end, dst address, src address)
    slow: list[tuple[Any, Any]] = []
    for i, ds in dsts.items():
        s = specs[i]
        for d in ds:
            if d.device.type == "cpu" and d.is_contiguous() and \
                    str(d.dtype).removeprefix("torch.") == s["dtype"]:
                if s["nbytes"]:
                    spans.append((s["offset"], s["offset"] + s["nbytes"], d.data_ptr(),
                                  srcs[i].data_ptr()))
            else:
                slow.append((d, srcs[i]))
    spans.sort()  # layouts never overlap, so the ends are sorted too
    view = memoryview(mm) if mm is not None else memoryview(b"")

    def chunk(k: int) -> None:
        c0, c1 = k * CHUNK, min(size, (k + 1) * CHUNK)
        mine = [sp for sp in spans if sp[0] < c1 and sp[1] > c0]
        h = CHECKS[algo]() if algo else None
        first = 0
        for off in range(c0, c1, PIECE):
            end = min(off + PIECE, c1)
            if h is not None:
                h.update(view[off:end])
            while first < len(mine) and mine[first][1] <= off:
                first += 1
            for a, b, dst, src in mine[first:]:
                if a >= end:
                    break
                lo, hi = max(a, off), min(b, end)
                ctypes.memmove(dst + lo - a, src + lo - a, hi - lo)
        if h is not None and want is not None and h.hexdigest() != want[k]:
            raise CheckpointError(f"verify {path}: chunk {k} (bytes {c0}-{c1}) fails its "
                                  f"{algo} hash (file damaged)")

    try:
        futures = [hash_pool().submit(chunk, k) for k in range(-(-size // CHUNK))]
        for f in futures:
            f.result()  # the first failing chunk, in file order
    finally:
        for f in futures:
            f.cancel()
        concurrent.futures.wait(futures)
        view.release()
    import torch

    with torch.no_grad():
        for d, src in slow:
            d.copy_(src)


def _check_chunks(path: Path, size: int, got: list[str], want: list[str], start: int,
                  algo: str) -> None:
    for i in range(start, len(got)):
        if i >= len(want) or got[i] != want[i]:
            raise CheckpointError(f"verify {path}: chunk {i} (bytes {i * CHUNK}-"
                                  f"{min((i + 1) * CHUNK, size)}) fails its {algo} "
                                  "hash (file damaged)")


def committed_rows(home: Path, run_id: str) -> list[dict[str, Any]]:
    """Committed checkpoints of a run, and those found corrupt (by ``ckpt verify``
    or an earlier restore, so ``restore`` can say why it skips them), newest
    first, read from the store read-only."""
    db = paths.db_path(home)
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(
                "SELECT step, hash, status, reason FROM checkpoints WHERE run_id = ? AND"
                " status IN ('committed', 'corrupt') ORDER BY step DESC", (run_id,)).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise CkptdError(f"restore: cannot read the store {db}: {exc}") from None
    return [dict(r) for r in rows]


def clone_tensors(obj: Any) -> Any:
    """``obj`` with every tensor copied into its own storage."""
    torch = sys.modules.get("torch")
    if torch is None:
        return obj  # no torch loaded: there are no tensors
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tensors(v) for v in obj)
    return obj


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def write_durable(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write a small file and fsync it before returning (manifests, records, RNG
    files): its content is durable; its directory entry needs the caller's
    directory fsync. ``exclusive``: refuse a file that is already there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
