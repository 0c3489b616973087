"""Restore lets the thread that checks a chunk fault its pages in (no
populate at all): every chunk is still checked before restore
returns, including the first and last byte of each chunk and a last chunk
that ends mid-page, on the plain path (tensors view the mapping), with
``into=`` (check fused with the copy) and in ``ckpt verify`` (read-only
mapping); restored tensors are right and writing them never reaches the file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from ckptd_client.checkpoint import format as fmt
from ckptd_client.errors import CheckpointError
from helpers import DaemonProc, run_script

A = 20 * 1024 * 1024  # float32: 80 MiB
B = 50 * 1024 * 1024 + 12345  # int8: the file ends 12345 + 64-alignment bytes into a page

MAKE = f"""
import torch, ckptd_client as ckptd
run = ckptd.init(name="edges")
a = torch.arange({A}, dtype=torch.float32)
b = (torch.arange({B}, dtype=torch.int64) % 251).to(torch.int8)
run.checkpoint({{"a": a, "b": b}}, step=1).wait(120)
print(run.id)
run.finish()
"""


def _expected() -> dict[str, torch.Tensor]:
    return {"a": torch.arange(A, dtype=torch.float32),
            "b": (torch.arange(B, dtype=torch.int64) % 251).to(torch.int8)}


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x80]))


def test_every_chunk_edge_is_checked_before_restore_returns(home: Path, daemon: DaemonProc
                                                            ) -> None:
    run_id = run_script(home, MAKE, timeout=300).stdout.split()[-1]
    d = home / "runs" / run_id / "checkpoints" / "step-1"
    data = d / fmt.DATA_FILE
    size = os.path.getsize(data)
    chunks = -(-size // fmt.CHUNK)
    assert chunks == 3 and size % 4096  # a partial last chunk ending mid-page
    want = _expected()

    payload, _ = fmt.load_dir(d)
    assert torch.equal(payload["state"]["a"], want["a"])
    assert torch.equal(payload["state"]["b"], want["b"])
    before = hashlib.sha256(data.read_bytes()).hexdigest()
    payload["state"]["a"].add_(1)  # private mapping: the file never changes
    payload["state"]["b"][-1] = 7
    del payload
    assert hashlib.sha256(data.read_bytes()).hexdigest() == before
    into = {"a": torch.zeros(A), "b": torch.zeros(B, dtype=torch.int8)}
    fmt.load_dir(d, into=into)
    assert torch.equal(into["a"], want["a"]) and torch.equal(into["b"], want["b"])
    fmt.verify_dir(d)

    for k in range(chunks):
        for at in (k * fmt.CHUNK, min((k + 1) * fmt.CHUNK, size) - 1):
            _flip(data, at)
            try:
                match = f"chunk {k} .*fails its xxh3_128"
                with pytest.raises(CheckpointError, match=match):
                    fmt.load_dir(d)
                with pytest.raises(CheckpointError, match=match):
                    fmt.load_dir(d, into={"a": torch.zeros(A),
                                          "b": torch.zeros(B, dtype=torch.int8)})
                with pytest.raises(CheckpointError, match=f"chunk {k} .*fails its blake3"):
                    fmt.verify_dir(d)
            finally:
                _flip(data, at)  # back, for the next position
    fmt.load_dir(d)  # flipped back: intact again

    # a torn last page (zeros where the tail should be), then a truncated file
    with open(data, "r+b") as f:
        f.seek(size - size % 4096)
        f.write(bytes(size % 4096))
    with pytest.raises(CheckpointError, match=f"chunk {chunks - 1} .*fails its xxh3_128"):
        fmt.load_dir(d)
    os.truncate(data, size - 1)
    with pytest.raises(CheckpointError, match="truncated"):
        fmt.load_dir(d)
    with pytest.raises(CheckpointError, match="truncated"):
        fmt.load_dir(d, into={"a": torch.zeros(A), "b": torch.zeros(B, dtype=torch.int8)})
