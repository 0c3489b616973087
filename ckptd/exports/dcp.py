"""``ckptd ckpt export --format dcp``: a checkpoint as a plain
``torch.distributed.checkpoint`` directory, and DCP steps as a ``torch.save`` file.

* A native step (one process, ckptd's own format) is loaded, verified in
  full, and written with ``dcp.save(..., no_dist=True)`` (no process group):
  the top level of the DCP checkpoint is the state the script checkpointed
  (``{"model": ..., "optim": ...}``), exactly as a DCP step that ranks wrote
  is, so ``dcp.load(state, checkpoint_id=DIR)`` fills the same state either way.
* A DCP step (``ckptd_client.dcp``) is already that layout: its files are
  copied out, each hashed as it is copied and compared with the manifest,
  so what lands in DIR is what was committed, or the export fails.
* ``--format torch`` / ``safetensors`` of a DCP step: :func:`load_payload`
  turns it into the same ``{"state", "rng"}`` a native step loads as, via
  ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``. DCP keeps
  dict keys as strings; :func:`int_optimizer_keys` gives an optimizer's
  parameter indices their ints back, other int keys stay strings.

Beside the DCP files, DIR holds ``ckptd-rng-<rank>.pt`` (RNG states, as in a
DCP step) and ``ckptd-export.json`` (run, step, metrics); DCP ignores both.

Order in DIR's making: everything is written into ``DIR.ckptd-tmp/``, each
file fsynced, the directory fsynced, then renamed to DIR and the parent
fsynced. CRASH WINDOW: a crash before the rename leaves only the ``-tmp``
directory (removed by the next export to DIR); DIR itself is whole or absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ckptd_client.checkpoint import format as fmt
from ckptd_client.dcp import RNG_PREFIX
from ckptd_client.errors import CheckpointError, CkptdError
from ckptd_client.spool import fsync_dir

#: Written beside the DCP files: where the export came from.
INFO_FILE = "ckptd-export.json"
#: Staging suffix of the directory being written.
TMP_SUFFIX = ".ckptd-tmp"


def _staging(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CkptdError(f"ckpt export {out}: exists and is not an empty directory; "
                         "name a new one")
    tmp = out.with_name(out.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier export to the same DIR
    tmp.mkdir(mode=0o700, parents=False)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    for p in tmp.iterdir():
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(tmp)
    if out.exists():
        out.rmdir()  # empty (checked in _staging): replaced by the whole one
    os.rename(tmp, out)
    fsync_dir(out.parent)


def _write_small(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def write_native(obj: dict[str, Any], out: Path) -> None:
    """Write a native step's loaded payload (``checkpoints.export``'s ``obj``) as DCP."""
    import torch
    import torch.distributed.checkpoint as dcp

    if not isinstance(obj["state"], dict):
        raise CkptdError(f"ckpt export --format dcp: step {obj['step']} holds a "
                         f"{type(obj['state']).__name__}, not a dict of state; use "
                         "--format torch")
    tmp = _staging(Path(out))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group: saving without one"
            dcp.save(obj["state"], no_dist=True, storage_writer=dcp.FileSystemWriter(
                tmp, single_file_per_rank=True, sync_files=True, thread_count=1))
        if obj.get("rng") is not None:
            buf = io.BytesIO()
            torch.save(obj["rng"], buf)
            _write_small(tmp / f"{RNG_PREFIX}0.pt", buf.getvalue())
        _write_small(tmp / INFO_FILE, _info(obj))
        _publish(tmp, Path(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_step(step_dir: Path, manifest: dict[str, Any], obj: dict[str, Any],
              out: Path) -> None:
    """Copy a DCP step's files to ``out``, each checked against its manifest hash."""
    tmp = _staging(Path(out))
    try:
        for name, info in sorted(manifest["files"].items()):
            if name == fmt.DATA_FILE:
                continue  # ckptd's own (empty) data file: not part of the DCP layout
            if "/" in name or name in ("", ".", ".."):
                raise CheckpointError(f"export {step_dir}: bad file name {name!r}")
            src = step_dir / name
            h = hashlib.sha256()
            size = 0
            try:
                with open(src, "rb") as fin, open(tmp / name, "xb") as fout:
                    while chunk := fin.read(8 << 20):
                        h.update(chunk)
                        fout.write(chunk)
                        size += len(chunk)
            except OSError as exc:
                raise CheckpointError(f"export {src}: {exc.strerror or exc}") from None
            if isinstance(info.get("sha256"), str):  # a step written before per-chunk hashes
                if size != info.get("bytes") or h.hexdigest() != info.get("sha256"):
                    raise CheckpointError(f"export {src}: does not match the manifest's size "
                                          "and sha256 (file damaged); nothing exported")
            else:  # per-chunk entries (format.hash_file): the copy itself is checked
                try:
                    fmt.verify_files(tmp, {name: info})
                except CheckpointError as exc:
                    raise CheckpointError(f"export {src}: {exc} (file damaged); nothing "
                                          "exported") from None
        _write_small(tmp / INFO_FILE, _info(obj))
        _publish(tmp, Path(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_dir(obj: dict[str, Any], step_dir: Path, manifest: dict[str, Any],
              out: Path) -> None:
    """``checkpoints.export``'s directory writer: copy a DCP step, convert a native one."""
    if manifest.get("dcp"):
        copy_step(step_dir, manifest, obj, out)
    else:
        write_native(obj, out)


def load_payload(step_dir: Path) -> dict[str, Any]:
    """A (verified) DCP step as ``{"state", "rng"}``: rank 0's RNG, the whole state."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="ckptd-dcp-") as td:
        path = Path(td) / "state.pt"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp_to_torch_save(step_dir, path)
            state = torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a file DCP cannot read
            raise CheckpointError(f"export {step_dir}: dcp_to_torch_save: {exc}") from None
    state = int_optimizer_keys(state)
    rng_path = step_dir / f"{RNG_PREFIX}0.pt"
    rng = torch.load(rng_path, weights_only=True) if rng_path.exists() else None
    return {"state": state, "rng": rng}


def int_optimizer_keys(tree: Any) -> Any:
    """DCP names every leaf by a dotted string, so ``dcp_to_torch_save`` turns an
    optimizer's ``state`` keys (parameter indices, ints) into ``"0"``, ``"1"``...,
    and ``optimizer.load_state_dict`` would silently match none of them. An
    optimizer state dict (``state`` beside ``param_groups``) gets its ints back;
    nothing else is touched."""
    if not isinstance(tree, dict):
        return tree
    out = {k: int_optimizer_keys(v) for k, v in tree.items()}
    st = out.get("state")
    if isinstance(out.get("param_groups"), list) and isinstance(st, dict) and \
            all(isinstance(k, str) and k.isdigit() for k in st):
        out["state"] = {int(k): v for k, v in st.items()}
    return out


def _info(obj: dict[str, Any]) -> bytes:
    return json.dumps({"format": "ckptd-export/1", "run": obj["run"], "step": obj["step"],
                       "metrics": obj.get("metrics") or {}}).encode()


__all__ = ["INFO_FILE", "copy_step", "load_payload", "write_dir", "write_native"]
