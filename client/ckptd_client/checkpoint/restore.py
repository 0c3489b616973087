"""``run.restore()``: the newest checkpoint that verifies, RNG states put
back last, and a word (stderr and a run event) for every checkpoint it
skipped and why.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import paths, transport
from ..errors import CheckpointError, CkptdError
from .format import clone_tensors, committed_rows, load_dir, read_manifest, step_dir_name

if TYPE_CHECKING:
    from pathlib import Path

    from ..run import Run

# ----------------------------------------------------------------- restore

def candidates(run: Run) -> Iterator[tuple[dict[str, Any], Path]]:
    """The run's committed checkpoints, newest first, with their directories;
    those an earlier ``ckpt verify`` marked corrupt are skipped, saying why."""
    for row in committed_rows(run.home, run.id):
        if row["status"] == "corrupt":
            skip(run, row["step"], f"marked corrupt earlier ({row['reason'] or 'no reason'})")
            continue
        yield row, paths.checkpoints_dir(run.home, run.id) / step_dir_name(row["step"])


def restore(run: Run, map_location: Any = None, into: Any = None) -> Any:
    """The state of the run's newest checkpoint that verifies, RNG restored last.

    ``into``: see :func:`load_dir` (verified copy straight into the model's
    tensors). A checkpoint that fails its check mid-copy is skipped like any
    other and the next older one overwrites ``into`` again; when none is
    left after ``into`` was written, CheckpointError says so instead of
    returning None with half-restored tensors.

    Checkpoints that fail verification are skipped with a warning and a run
    event saying why (and reported to the daemon, which marks them corrupt,
    when it is there; restoring itself never needs the daemon).
    """
    from .. import rng

    await_commits(run)
    touched = False
    for row, ckpt_dir in candidates(run):
        try:
            manifest, _ = read_manifest(ckpt_dir, row["hash"])
            if manifest.get("dcp"):
                if into is None:
                    raise CkptdError(f"restore: checkpoint step {row['step']} is sharded (torch."
                                     "distributed.checkpoint): load it with "
                                     "run.restore(into=state)")
                from .. import dcp  # a sharded step: torch.distributed.checkpoint loads it

                return dcp.restore(run, into)
            payload, _ = load_dir(ckpt_dir, row["hash"], map_location, into=into)
        except CheckpointError as exc:
            touched = touched or into is not None and "fails its" in str(exc)
            skip(run, row["step"], str(exc))
            report_corrupt(run, row["step"], str(exc))
            continue
        if payload.get("rng"):
            # own storage: the generators reject views into the mapped file
            rng.restore(clone_tensors(payload["rng"]))  # last: nothing after draws a number
            run._rng_watch = rng.PlacementWatch(lambda text: _misplaced(run, text))
        announce(run, row["step"])
        return payload["state"]
    announce(run, None)
    if touched:
        raise CheckpointError("restore: no checkpoint verifies, and the last one tried had "
                              "already been partly copied into the tensors of into=")
    return None


def _misplaced(run: Run, text: str) -> None:
    """Say it where a person looks: a warning at their log()/checkpoint() line
    (stderr), and the run's events (``ckptd tail``)."""
    warnings.warn(text, stacklevel=6)
    try:
        run.event(text, level="warning")
    except Exception:  # noqa: BLE001 - the warnings above already said it
        pass


def skip(run: Run, step: int, why: str) -> None:
    """Say, as a warning and a run event, why restore passed over a checkpoint."""
    text = f"restore: skipped checkpoint step {step}: {why}"
    warnings.warn(text, stacklevel=4)
    try:
        run.event(text, level="warning", skipped_step=step)
    except Exception:  # noqa: BLE001 - the warning above already said it
        pass


def announce(run: Run, step: int | None) -> None:
    """Record which step this attempt continues from (None: it starts over)."""
    run.restored_step = step
    try:
        run._report_restored(step)
    except Exception:  # noqa: BLE001 - a courtesy record; the state is already restored
        pass


def await_commits(run: Run) -> None:
    """Let the daemon finish committing what an earlier attempt sent (a trainer
    killed right after checkpoint() returned), so the newest step is chosen."""
    try:
        transport.call(run.home, "ckpt_await_commits", {"run": run.id, "timeout": 300},
                       autostart=False, timeout=310)
    except CkptdError:
        pass  # no daemon: nothing can be committing


def report_corrupt(run: Run, step: int, reason: str) -> None:
    try:
        transport.call(run.home, "ckpt_mark_corrupt",
                       {"run": run.id, "step": step, "reason": reason}, autostart=False,
                       timeout=5)
    except CkptdError:
        pass


__all__ = ["announce", "await_commits", "candidates", "report_corrupt", "restore", "skip"]
