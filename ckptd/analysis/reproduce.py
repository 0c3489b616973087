"""``ckptd reproduce RUN``: rerun a finished run from what was recorded, and say
whether it came out the same.

The rerun happens in a clean checkout of the recorded commit with the
recorded diff applied (never in the directory as it is today, which has moved
on), with the recorded command and environment (seeds and thread settings are
in them), launched through ``ckptd run`` so it is a supervised run like any
other. Then the two effective metric timelines are compared value by value
(bit for bit: ``0.1 + 0.2`` is not ``0.3``) in step order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ckptd_client.errors import CkptdError, NotFound
from ckptd_client.identity import new_run_id

from ckptd.store.query import Reader

#: Where the clean checkouts go, under the home (kept: the new run's cwd is there).
WORKTREES = "reproduce"
#: Provenance facts that differ on every run and explain nothing.
IGNORED = {"git_diff", "boot_id", "seed_source"}
#: Environment variables that change numerics (thread counts, determinism knobs).
NUMERIC_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED",
               "CUDA_VISIBLE_DEVICES", "TORCH_DETERMINISTIC", "NVIDIA_TF32_OVERRIDE")
#: Differing values shown at the first differing step.
SHOWN = 5


class ReproduceError(CkptdError):
    """The run cannot be rerun as recorded (no command, repository gone, diff does not apply)."""


def _git(cwd: str | Path, *args: str, data: str | None = None) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                             input=data, timeout=120,
                             stdin=None if data is not None else subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReproduceError(f"git {args[0]} in {cwd}: {exc}") from None
    if out.returncode != 0:
        raise ReproduceError(f"git {' '.join(args[:2])} in {cwd}: "
                             f"{(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return out.stdout


def prepare_worktree(home: Path, run: dict[str, Any], prov: dict[str, Any]) -> tuple[Path, Path]:
    """A clean checkout of the recorded commit plus the recorded diff.

    A repository of its own (``git init`` + a shallow fetch of just that
    commit from the run's repository), not a ``git worktree add``: that
    registered the checkout in the user's repository, which listed it (then
    "prunable") long after the reproduce directory was deleted. The user's
    repository is only read: no worktree entry, ref, config or object is
    added to it. The fetch asks for the commit by id, so one that no branch
    holds any more (an amended or rebased one, a detached HEAD) is found
    as long as the object exists.

    Returns ``(checkout root, directory to run in)``.
    """
    cwd = run.get("cwd")
    commit = prov.get("git_commit")
    if not cwd or not commit:
        raise ReproduceError(f"reproduce {run['id']}: no git commit was recorded for this run "
                             "(it did not run inside a git repository), so there is no "
                             "clean source to rerun")
    diff = prov.get("git_diff") or ""
    if diff and prov.get("git_diff_hash") and \
            hashlib.sha256(diff.encode()).hexdigest() != prov["git_diff_hash"]:
        raise ReproduceError(f"reproduce {run['id']}: the recorded diff is incomplete (it was "
                             "cut at 1 MB when recorded), so the source cannot be rebuilt")
    if not Path(cwd).is_dir():
        raise ReproduceError(f"reproduce {run['id']}: its directory {cwd} is gone; the "
                             f"repository that holds commit {commit[:12]} is needed")
    top = Path(_git(cwd, "rev-parse", "--show-toplevel").strip())
    rel = os.path.relpath(os.path.realpath(cwd), os.path.realpath(top))
    dest = home / WORKTREES / f"{run['id']}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    dest.mkdir(mode=0o700)
    try:
        _git(dest, "init", "-q")
        _git(dest, "fetch", "-q", "--depth", "1", "--no-tags", os.fspath(top), commit)
        _git(dest, "-c", "advice.detachedHead=false", "checkout", "-q", "--detach", commit)
        if diff:
            _git(dest, "apply", "--whitespace=nowarn", "-", data=diff)
    except ReproduceError:
        shutil.rmtree(dest, ignore_errors=True)  # half a checkout reruns nothing
        raise
    return dest, (dest / rel if rel != "." else dest)


def relocate(command: list[str], top: Path, dest: Path) -> list[str]:
    """The recorded command with paths inside the original checkout moved into the copy."""
    out = []
    real_top = os.path.realpath(top)
    for arg in command:
        if os.path.isabs(arg) and os.path.realpath(arg).startswith(real_top + os.sep):
            arg = os.fspath(dest / os.path.relpath(os.path.realpath(arg), real_top))
        out.append(arg)
    return out


def launch(home: Path, run: dict[str, Any], dest: Path, workdir: Path, new_id: str,
           out: Any) -> int:
    """Run it again through ``ckptd run`` (the same supervisor as any run)."""
    command = json.loads(run["command"])
    top = Path(_git(run["cwd"], "rev-parse", "--show-toplevel").strip())
    command = relocate(command, top, dest)
    for arg in command[1:]:
        if arg.startswith(os.fspath(dest) + os.sep) and not os.path.exists(arg):
            raise ReproduceError(f"reproduce {run['id']}: {os.path.relpath(arg, dest)} is not "
                                 "in the recorded commit (untracked files are not recorded); "
                                 "commit it before the runs you want to reproduce")
    env = {k: v for k, v in (json.loads(run["env"]) if run.get("env") else {}).items()
           if not k.startswith("CKPTD_")}
    env.update({k: v for k, v in os.environ.items() if k.startswith("CKPTD_")})
    env.update(CKPTD_HOME=os.fspath(home), PWD=os.fspath(workdir))
    name = f"{run['name']}-reproduced"[:200]
    argv = [sys.executable, "-m", "ckptd", "--home", os.fspath(home), "run", "--name", name,
            "--run-id", new_id, "--", *command]
    try:
        proc = subprocess.run(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                              stdout=out, stderr=out)
    except OSError as exc:
        raise ReproduceError(f"reproduce {run['id']}: cannot start ckptd run: {exc}") from None
    return proc.returncode


def _bits(v: float) -> bytes:
    return b"nan" if math.isnan(v) else struct.pack("<d", v)


def timeline(reader: Reader, run_id: str) -> dict[tuple[int, str], float]:
    return {(r["step"], r["key"]): r["value"] for r in reader.metrics(run_id)}


def compare_curves(a: dict[tuple[int, str], float],
                   b: dict[tuple[int, str], float]) -> dict[str, Any]:
    """Value-by-value comparison of two effective timelines, in step order."""
    diffs = []
    for step, key in sorted(set(a) | set(b)):
        va, vb = a.get((step, key)), b.get((step, key))
        if va is None or vb is None or _bits(va) != _bits(vb):
            diffs.append({"step": step, "key": key, "original": va, "reproduced": vb})
    first = diffs[0]["step"] if diffs else None
    return {"identical": not diffs and bool(a), "first_diff_step": first,
            "differing_values": len(diffs),
            "first_differences": [d for d in diffs if d["step"] == first][:SHOWN],
            "values_compared": len(set(a) | set(b))}


def last_values(curve: dict[tuple[int, str], float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for (_step, key), v in sorted(curve.items()):
        out[key] = v
    return out


def provenance_differences(orig: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """Recorded facts that differ between the runs: what could explain a difference."""
    po = json.loads(orig["provenance"]) if orig.get("provenance") else {}
    pn = json.loads(new["provenance"]) if new.get("provenance") else {}
    out = {k: [po.get(k), pn.get(k)] for k in sorted(set(po) | set(pn))
           if k not in IGNORED and po.get(k) != pn.get(k) and k != "executable"}
    eo = json.loads(orig["env"]) if orig.get("env") else {}
    en = json.loads(new["env"]) if new.get("env") else {}
    for k in NUMERIC_ENV:
        if eo.get(k) != en.get(k):
            out[f"env.{k}"] = [eo.get(k), en.get(k)]
    return out


def reproduce(home: Path, ref: str | None, *, out: Any = None) -> dict[str, Any]:
    """Rerun ``ref`` and compare; the dict is what ``--json`` prints."""
    with Reader(home) as reader:
        run = reader.resolve(ref)
    if run["status"] == "running":
        raise ReproduceError(f"reproduce {run['id']}: the run is still running; reproduce it "
                             "once it has finished")
    if not run.get("command"):
        raise ReproduceError(f"reproduce {run['id']}: no command was recorded for this run")
    prov = json.loads(run["provenance"]) if run.get("provenance") else {}
    dest, workdir = prepare_worktree(home, run, prov)
    new_id = new_run_id()
    code = launch(home, run, dest, workdir, new_id, out if out is not None else sys.stderr)
    with Reader(home) as reader:
        try:
            new = reader.resolve(new_id)
        except NotFound:
            raise ReproduceError(f"reproduce {run['id']}: the rerun exited with status {code} "
                                 "before it registered; see its output above") from None
        result = compare_curves(timeline(reader, run["id"]), timeline(reader, new_id))
        result["final"] = {"original": last_values(timeline(reader, run["id"])),
                           "reproduced": last_values(timeline(reader, new_id))}
    result.update(run=run["id"], reproduction=new_id, worktree=os.fspath(dest),
                  exit_code=code, original_exit_code=run.get("exit_code"),
                  provenance_differences=provenance_differences(run, new))
    if code != (run.get("exit_code") or 0):
        result["identical"] = False
    return result


__all__ = ["ReproduceError", "reproduce", "compare_curves", "provenance_differences"]
