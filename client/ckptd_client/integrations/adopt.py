"""Adopted checkpoints, client side: ``run.adopt_checkpoint`` and ``run.latest_checkpoint_path``.

Frameworks write their own checkpoints; the daemon copies one into
``runs/<run>/checkpoints/step-<N>/adopted/<name>`` through the native commit
protocol (``ckptd.adopt``). Restoring one means finding the newest whose
every byte still matches the hashes in its manifest: a damaged one is
skipped with a warning and a run event saying why, exactly like ``restore()``.
Standard library only.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import transport
from ..errors import CheckpointError, CkptdError

if TYPE_CHECKING:
    from ..run import Run

#: The manifest tree of an adopted checkpoint is ``{"state": {ADOPTED_KEY: name}}``.
ADOPTED_KEY = "__ckptd_adopted__"
#: The folder inside ``step-<N>/`` holding the adopted file or folder.
ADOPTED_DIR = "adopted"
#: Adopting copies and hashes in the daemon: gigabytes take a while.
ADOPT_TIMEOUT_S = 3600.0


class AdoptHandle:
    """An adoption in flight (the copy runs in the daemon; training goes on)."""

    def __init__(self, run: Run, path: Path, step: int, metrics: dict[str, Any]) -> None:
        self.step = step
        self._result: dict[str, Any] | None = None
        self._error: CkptdError | None = None
        self._done = threading.Event()
        args = {"run": run.id, "attempt": run.attempt, "step": step,
                "path": os.fspath(path), "metrics": metrics}
        threading.Thread(target=self._call, args=(run.home, args), daemon=True,
                         name=f"ckptd-adopt-{step}").start()

    def _call(self, home: Path, args: dict[str, Any]) -> None:
        try:
            self._result = transport.call(home, "ckpt_adopt", args, timeout=ADOPT_TIMEOUT_S)
        except CkptdError as exc:
            self._error = exc
        except Exception as exc:  # noqa: BLE001 - reported through wait(), never a crash
            self._error = CheckpointError(f"adopt step {args['step']}: {exc}")
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """``{"step", "hash", "path", "persist_s"}`` once durable and recorded.

        :raises CheckpointError: it failed (the message says why), or ``timeout`` passed.
        """
        if not self._done.wait(timeout):
            raise CheckpointError(f"adopt step {self.step}: not committed within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def adopt(run: Run, path: str | os.PathLike[str], step: int,
          metrics: dict[str, Any] | None = None) -> AdoptHandle:
    """See :meth:`ckptd_client.Run.adopt_checkpoint`."""
    from ..protocol import check_metric

    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, not {step!r}")
    p = Path(path).absolute()
    if not p.exists():
        raise CheckpointError(f"adopt {p}: no such file or folder")
    values = {k: check_metric(k, v) for k, v in (metrics or {}).items()}
    return AdoptHandle(run, p, step, values)


def verify_adopted(ckpt_dir: Path, adopted: dict[str, Any], sizes_only: bool = False) -> Path:
    """Check every adopted file against its manifest hashes (``sizes_only``: the
    cheap check reconcile gives older checkpoints); returns the adopted path.

    :raises CheckpointError: a file is missing, has the wrong size or fails a hash.
    """
    from ..checkpoint.format import chunk_hashes

    root = ckpt_dir / ADOPTED_DIR
    algo = adopted["algo"]
    for rel, info in adopted["files"].items():
        path = root / rel
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != info["bytes"]:
                    raise CheckpointError(f"verify {path}: {size} bytes, manifest says "
                                          f"{info['bytes']} (truncated or damaged)")
                if sizes_only:
                    continue
                got = []
                if size:
                    with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
                        got = chunk_hashes(mm, size, algo)
        except OSError as exc:
            raise CheckpointError(f"read {path}: {exc.strerror or exc}") from None
        for i, (a, b) in enumerate(zip(got, info[algo], strict=False)):
            if a != b:
                raise CheckpointError(f"verify {path}: chunk {i} fails its {algo} hash "
                                      "(file damaged)")
        if len(got) != len(info[algo]):
            raise CheckpointError(f"verify {path}: wrong number of chunks")
    return root / adopted["root"]


def latest_path(run: Run) -> str | None:
    """The newest adopted checkpoint of the run that verifies, as a path; None if none.

    Like ``restore()``: waits for commits an earlier attempt left in flight,
    skips (saying why) what fails verification, and records the step this
    attempt continues from. Native checkpoints are not paths: passed over.
    """
    from ..checkpoint.format import read_manifest
    from ..checkpoint.restore import announce, await_commits, candidates, report_corrupt, skip

    await_commits(run)
    for row, ckpt_dir in candidates(run):
        try:
            manifest, _ = read_manifest(ckpt_dir, row["hash"])
            if "adopted" not in manifest:
                continue
            found = verify_adopted(ckpt_dir, manifest["adopted"])
        except CheckpointError as exc:
            skip(run, row["step"], str(exc))
            report_corrupt(run, row["step"], str(exc))
            continue
        announce(run, row["step"])
        return os.fspath(found)
    announce(run, None)
    return None
