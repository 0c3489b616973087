"""Provenance recorded with a run: enough to tell whether a resumed run is
still the same program on the same machine with the same packages."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from typing import Any


def collect(cwd: str | None = None) -> dict[str, Any]:
    """Gather provenance; every part is best effort and bounded in time."""
    from .identity import boot_id

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "boot_id": boot_id(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
    }
    try:
        info["torch"] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        info["torch"] = None
    torch = sys.modules.get("torch")
    if torch is not None:
        info["cuda"] = getattr(torch.version, "cuda", None)
    info["packages_hash"] = packages_hash()
    info.update(git_state(cwd or os.getcwd()))
    return info


@functools.lru_cache(maxsize=1)
def packages_hash() -> str:
    """Hash of the installed distributions (what ``pip freeze`` would list),
    read from metadata instead of spawning pip (seconds saved per start).
    Once per process: reading every distribution's metadata took 0.15 s, and
    a sweep or notebook calls init() many times."""
    names = sorted(
        f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
        if d.metadata and d.metadata["Name"]
    )
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def git_state(cwd: str) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=5,
                                 stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.decode(errors="replace") if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None}
    diff = git("diff", "HEAD") or ""
    return {
        "git_commit": commit.strip(),
        "git_dirty": bool(diff),
        "git_diff_hash": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
        "git_diff": diff[:1_000_000] if diff else None,
    }
