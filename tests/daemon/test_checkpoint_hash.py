"""The checkpoint data hash (blake3, computed while the daemon writes): every
flipped, torn or truncated byte is caught by ``ckpt verify`` and by restore
(also when restore copies straight into the model, ``into=``); checkpoints
written before (sha256 + crc32 manifests) still verify; tied tensors are
stored once and restored shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

import pytest
from ckptd_client.checkpoint import format as fmt
from ckptd_client.errors import CheckpointError
from helpers import DaemonProc, damage_file, env_for, run_script

#: 80 MiB of float32: two 64 MiB chunks, so chunk boundaries are exercised.
MAKE = """
import torch, ckptd_client as ckptd
run = ckptd.init(name="hash")
n = 20 * 1024 * 1024
for step in (10, 20):
    w = torch.arange(n, dtype=torch.float32) + step
    run.checkpoint({"w": w, "step": step}, step=step).wait(120)
print(run.id)
run.finish()
"""


def _make(home: Path) -> tuple[str, Path]:
    run_id = run_script(home, MAKE, timeout=300).stdout.split()[-1]
    return run_id, home / "runs" / run_id / "checkpoints"


def _damaged(src: Path, tmp: Path, how: str) -> Path:
    d = tmp / how
    shutil.copytree(src, d)
    damage_file(d / fmt.DATA_FILE, how)
    return d


def test_blake3_catches_flipped_torn_and_truncated_bytes(home: Path, daemon: DaemonProc,
                                                         tmp_path: Path) -> None:
    _, ckpts = _make(home)
    step20 = ckpts / "step-20"
    manifest = json.loads((step20 / fmt.MANIFEST_FILE).read_text())
    info = manifest["files"][fmt.DATA_FILE]
    assert len(info["blake3"]) == 2 and "sha256" not in info and "crc32" not in info
    fmt.verify_dir(step20)  # intact: verifies
    for how in ("flip", "torn", "truncated"):
        d = _damaged(step20, tmp_path, how)
        want = "truncated" if how == "truncated" else "fails its blake3"
        with pytest.raises(CheckpointError, match=want):
            fmt.verify_dir(d)
        fast = "truncated" if how == "truncated" else "fails its xxh3_128"
        with pytest.raises(CheckpointError, match=fast):
            fmt.load_dir(d)  # restore's check (tests/client/test_restore_fast_check.py)
        import torch

        with pytest.raises(CheckpointError, match=fast):
            fmt.load_dir(d, into={"w": torch.zeros(20 * 1024 * 1024)})


def test_old_sha256_manifest_still_verifies(home: Path, daemon: DaemonProc,
                                            tmp_path: Path) -> None:
    """A checkpoint written before blake3: chunk sha256 (verify) and crc32 (restore)."""
    _, ckpts = _make(home)
    old = tmp_path / "old"
    shutil.copytree(ckpts / "step-10", old)
    data = (old / fmt.DATA_FILE).read_bytes()
    chunks = [data[o:o + fmt.CHUNK] for o in range(0, len(data), fmt.CHUNK)]
    manifest = json.loads((old / fmt.MANIFEST_FILE).read_text())
    manifest["files"][fmt.DATA_FILE] = {
        "bytes": len(data), "chunk": fmt.CHUNK,
        "sha256": [hashlib.sha256(c).hexdigest() for c in chunks],
        "crc32": [f"{zlib.crc32(c):08x}" for c in chunks]}
    body = json.dumps(manifest, separators=(",", ":")).encode()
    (old / fmt.MANIFEST_FILE).write_bytes(body)
    row_hash = "sha256:" + hashlib.sha256(body).hexdigest()
    fmt.verify_dir(old, row_hash)
    payload, _ = fmt.load_dir(old, row_hash)
    assert float(payload["state"]["w"][5]) == 15.0
    flipped = _damaged(old, tmp_path, "flip")
    with pytest.raises(CheckpointError, match="fails its sha256"):
        fmt.verify_dir(flipped, row_hash)
    with pytest.raises(CheckpointError, match="fails its crc32"):
        fmt.load_dir(flipped, row_hash)


def test_restore_into_copies_verified_and_falls_back(home: Path, daemon: DaemonProc) -> None:
    run_id, ckpts = _make(home)
    with open(ckpts / "step-20" / fmt.DATA_FILE, "r+b") as f:  # second chunk: after a copy
        f.seek(70 << 20)
        b = f.read(1)
        f.seek(70 << 20)
        f.write(bytes([b[0] ^ 0x80]))
    out = run_script(home, """
import warnings, torch, ckptd_client as ckptd
run = ckptd.init()
w = torch.zeros(20 * 1024 * 1024)
try:
    run.restore(into={"w": torch.zeros(3)})
except ValueError as exc:
    print("mismatch:", exc)
with warnings.catch_warnings(record=True):
    warnings.simplefilter("always")
    st = run.restore(into={"w": w})
ok = torch.equal(w, torch.arange(w.numel(), dtype=torch.float32) + 10)
print("restored", st["step"], st["w"] is w, ok)
run.finish()
""", env=env_for(home, CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT="2"), timeout=300).stdout
    assert "mismatch: restore(into=...): state['w'] has shape (3,)" in out, out
    assert "restored 10 True True" in out, out


def test_tied_tensors_stored_once_and_restored_shared(home: Path, daemon: DaemonProc) -> None:
    out = run_script(home, """
import json, torch, ckptd_client as ckptd

def make():
    emb = torch.nn.Embedding(1000, 64)
    head = torch.nn.Linear(64, 1000, bias=False)
    head.weight = emb.weight  # tied
    return torch.nn.ModuleDict({"emb": emb, "head": head})

run = ckptd.init(name="tied")
m = make()
run.checkpoint({"model": m.state_dict()}, step=1).wait(60)
man = json.loads((run.home / "runs" / run.id / "checkpoints" / "step-1" /
                  "manifest.json").read_text())
print("stored", sum(t["nbytes"] == 1000 * 64 * 4 for t in man["tensors"]))
st = run.restore()
a, b = st["model"]["emb.weight"], st["model"]["head.weight"]
print("shared", a.data_ptr() == b.data_ptr(), torch.equal(a, m.emb.weight))
m2 = make()
sd = m2.state_dict()
run.restore(into={"model": sd})
print("into", torch.equal(m2.emb.weight, m.emb.weight), m2.head.weight is m2.emb.weight)
run.finish()
""", timeout=300).stdout
    assert "stored 1" in out and "shared True True" in out and "into True True" in out, out


def test_hash_dir_and_verify_files_catch_damage(tmp_path: Path) -> None:
    """The pair adopted (not ckptd-written) checkpoint directories are checked with."""
    d = tmp_path / "adopted"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(os.urandom((64 << 20) + 5))  # two chunks
    (d / "sub" / "b.json").write_bytes(b"{}")
    files = fmt.hash_dir(d)
    assert sorted(files) == ["a.bin", "sub/b.json"] and len(files["a.bin"]["blake3"]) == 2
    fmt.verify_files(d, files)
    with open(d / "a.bin", "r+b") as f:
        f.seek((64 << 20) + 1)
        b = f.read(1)
        f.seek((64 << 20) + 1)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match="chunk 1 .* fails its blake3"):
        fmt.verify_files(d, files)
    (d / "sub" / "b.json").write_bytes(b"{")
    with pytest.raises(CheckpointError, match="truncated"):
        fmt.verify_files(d, {"sub/b.json": files["sub/b.json"]})
    with pytest.raises(CheckpointError, match="leaves the directory"):
        fmt.verify_files(d, {"../x": files["sub/b.json"]})
