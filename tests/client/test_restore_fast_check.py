"""Restore's fast chunk check (xxh3-128, recorded beside blake3 in the pass
that writes the data): every flipped, torn or truncated byte is still caught
when restore loads (also ``into=``) and through ``run.restore()``; ``ckpt
verify`` keeps blake3; manifests without xxh3-128 (older checkpoints), and
processes without the ``xxhash`` package, restore and verify with blake3.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import xxhash
from ckptd_client.checkpoint import format as fmt
from ckptd_client.errors import CheckpointError
from helpers import DaemonProc, damage_file, env_for, run_script

N = 20 * 1024 * 1024  # 80 MiB of float32: two chunks

MAKE = f"""
import torch, ckptd_client as ckptd
run = ckptd.init(name="fast")
for step in (10, 20):
    w = torch.arange({N}, dtype=torch.float32) + step
    run.checkpoint({{"w": w, "step": step}}, step=step).wait(120)
print(run.id)
run.finish()
"""


def _make(home: Path) -> tuple[str, Path]:
    run_id = run_script(home, MAKE, timeout=300).stdout.split()[-1]
    return run_id, home / "runs" / run_id / "checkpoints"


def _damage(d: Path, how: str) -> None:
    damage_file(d / fmt.DATA_FILE, how)


def _rewrite_manifest(d: Path, change: dict) -> str:
    """Edit the data file's entry; returns the new manifest's row hash."""
    manifest = json.loads((d / fmt.MANIFEST_FILE).read_text())
    info = manifest["files"][fmt.DATA_FILE]
    for k, v in change.items():
        if v is None:
            info.pop(k, None)
        else:
            info[k] = v
    body = json.dumps(manifest, separators=(",", ":")).encode()
    (d / fmt.MANIFEST_FILE).write_bytes(body)
    return "sha256:" + hashlib.sha256(body).hexdigest()


def test_written_with_both_and_restore_checks_xxh3(home: Path, daemon: DaemonProc,
                                                   tmp_path: Path) -> None:
    _, ckpts = _make(home)
    step20 = ckpts / "step-20"
    info = json.loads((step20 / fmt.MANIFEST_FILE).read_text())["files"][fmt.DATA_FILE]
    data = (step20 / fmt.DATA_FILE).read_bytes()
    want = [xxhash.xxh3_128(data[o:o + fmt.CHUNK]).hexdigest()
            for o in range(0, len(data), fmt.CHUNK)]
    assert info["xxh3_128"] == want and len(info["blake3"]) == 2
    fmt.verify_dir(step20)
    payload, _ = fmt.load_dir(step20)
    assert float(payload["state"]["w"][5]) == 25.0
    for how in ("flip", "torn", "truncated"):
        d = tmp_path / how
        shutil.copytree(step20, d)
        _damage(d, how)
        match = "truncated" if how == "truncated" else "chunk [01] .*fails its xxh3_128"
        with pytest.raises(CheckpointError, match=match):
            fmt.load_dir(d)
        with pytest.raises(CheckpointError, match=match):
            fmt.load_dir(d, into={"w": torch.zeros(N), "step": 0})
        with pytest.raises(CheckpointError, match="truncated" if how == "truncated"
                           else "fails its blake3"):
            fmt.verify_dir(d)  # ckpt verify keeps the cryptographic hash
    # restore really reads the fast check: a wrong xxh3 (blake3 right) fails
    # restore and passes verify
    d = tmp_path / "wrong-xxh3"
    shutil.copytree(step20, d)
    row = _rewrite_manifest(d, {"xxh3_128": [want[0], "0" * 32]})
    fmt.verify_dir(d, row)
    with pytest.raises(CheckpointError, match="chunk 1 .*fails its xxh3_128"):
        fmt.load_dir(d, row)
    with pytest.raises(CheckpointError, match="chunk 1 .*fails its xxh3_128"):
        fmt.load_dir(d, row, into={"w": torch.zeros(N)})


def test_old_manifest_without_xxh3_restores_with_blake3(home: Path, daemon: DaemonProc,
                                                        tmp_path: Path) -> None:
    _, ckpts = _make(home)
    old = tmp_path / "old"
    shutil.copytree(ckpts / "step-10", old)
    row = _rewrite_manifest(old, {"xxh3_128": None})
    fmt.verify_dir(old, row)
    payload, _ = fmt.load_dir(old, row)
    assert float(payload["state"]["w"][5]) == 15.0
    w = torch.zeros(N)
    fmt.load_dir(old, row, into={"w": w})
    assert torch.equal(w, torch.arange(N, dtype=torch.float32) + 10)
    _damage(old, "flip")
    with pytest.raises(CheckpointError, match="fails its blake3"):
        fmt.load_dir(old, row)
    with pytest.raises(CheckpointError, match="fails its blake3"):
        fmt.load_dir(old, row, into={"w": w})


def test_run_restore_skips_damaged_with_fast_check_and_without_xxhash(
        home: Path, daemon: DaemonProc) -> None:
    """Through ``run.restore()``: the damaged newest step is skipped saying which
    check failed; a process without xxhash falls back to blake3 and still
    catches it."""
    run_id, ckpts = _make(home)
    _damage(ckpts / "step-20", "flip")
    script = """
import sys, warnings
if sys.argv[1] == "no-xxhash":
    sys.modules["xxhash"] = None  # the package is not installed
import torch, ckptd_client as ckptd
run = ckptd.init()
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter("always")
    st = run.restore()
print("restored", st["step"], float(st["w"][5]))
print("why", [str(w.message) for w in ws if "skipped" in str(w.message)])
run.finish()
"""
    for mode, check in (("xxhash", "xxh3_128"), ("no-xxhash", "blake3")):
        out = run_script(home, script, args=[mode], env=env_for(
            home, CKPTD_RUN_ID=run_id, CKPTD_ATTEMPT="2"), timeout=300).stdout
        assert "restored 10 15.0" in out, out
        assert "step 20" in out and f"fails its {check}" in out, out
