"""PyTorch Lightning: a ``Logger`` writing into a ckptd run, and a ``CheckpointIO``
that hands every checkpoint Lightning writes to the daemon.

    logger = CkptdLogger(name="mnist")
    trainer = L.Trainer(logger=logger, plugins=[logger.checkpoint_io], ...)
    trainer.fit(model, datamodule=dm, ckpt_path=logger.resume_path())

``ModelCheckpoint`` keeps writing its ``.ckpt`` files where it always did; each
one, once written, is adopted (``run.adopt_checkpoint``: copied, fsynced,
hashed, retained by the daemon). ``resume_path()`` is the newest adopted
checkpoint that still verifies, so ``trainer.fit(ckpt_path=...)`` restores
Lightning's own optimizer, scheduler, loop and RNG state from a copy ckptd
vouches for. Imported only by users who have Lightning (``ckptd[lightning]``).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

from . import require

require("lightning", "lightning")

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment  # noqa: E402
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402

from .. import rng  # noqa: E402
from ..errors import CkptdError  # noqa: E402
from ..run import Run, init  # noqa: E402
from .adopt import AdoptHandle  # noqa: E402
from .params import flat_params  # noqa: E402

#: Where the RNG states go in a Lightning checkpoint dict.
RNG_KEY = "ckptd_rng"


class CkptdCheckpointIO(CheckpointIO):
    """Lightning's own writer (``TorchCheckpointIO`` unless given), then an adoption.

    The daemon copies a file while training goes on, and Lightning rewrites
    ``last.ckpt`` in place and deletes checkpoints ``save_top_k`` drops: so a
    save or removal of a path first waits for that path's copy to finish
    (the window in which a torn or vanished file would be copied).
    """

    def __init__(self, logger: CkptdLogger, inner: CheckpointIO | None = None) -> None:
        self.logger = logger
        self.inner = inner or TorchCheckpointIO()
        self._pending: dict[str, AdoptHandle] = {}
        self._steps: set[int] = set()
        self._lock = threading.Lock()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        self._settle(path)
        # Lightning saves no RNG state: without it dropout and shuffling after a
        # resume differ from an uninterrupted run
        checkpoint = {**checkpoint, RNG_KEY: rng.capture()}
        self.inner.save_checkpoint(checkpoint, path, storage_options)
        done = checkpoint.get("global_step")
        if not isinstance(done, int):
            return
        # Lightning logs a batch's metrics at the number of optimizer steps done
        # before it (epoch-end metrics at the last batch's step): a checkpoint
        # after G steps holds everything logged at steps < G. Recorded as step
        # G - 1, a resume supersedes exactly what the killed attempt logged
        # after it, and Lightning's next log (step G) continues the timeline.
        step = max(done - 1, 0)
        if step in self._steps:
            return  # save_last writes the same step again under last.ckpt: one copy is enough
        try:
            handle = self.logger.experiment.adopt_checkpoint(path, step)
        except (CkptdError, ValueError) as exc:  # never kills training (SPEC promise 4)
            self.logger._warn("adopt", f"checkpoint {path} not adopted: {exc}")
            return
        with self._lock:
            self._steps.add(step)
            self._pending[os.fspath(path)] = handle

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        **kwargs: Any) -> dict[str, Any]:
        checkpoint = self.inner.load_checkpoint(path, map_location=map_location, **kwargs)
        state = checkpoint.pop(RNG_KEY, None)
        if state is not None:
            # at load, before the loop draws anything (shuffle, dropout)
            rng.restore(state)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        self._settle(path)
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.wait()
        self.inner.teardown()

    def wait(self, timeout: float | None = None) -> None:
        """Every adoption started so far has committed (or failed, with a warning)."""
        with self._lock:
            keys = list(self._pending)
        for key in keys:
            self._settle(key, timeout)

    def _settle(self, path: Any, timeout: float | None = None) -> None:
        with self._lock:
            handle = self._pending.pop(os.fspath(path), None)
        if handle is None:
            return
        try:
            handle.wait(timeout)
        except CkptdError as exc:
            self.logger._warn("adopt", f"checkpoint {path} not adopted: {exc}")


class CkptdLogger(Logger):
    """A Lightning ``Logger`` whose experiment is a ckptd :class:`~ckptd_client.Run`.

    :param run: log into this run; otherwise one is started with ``init_kwargs``
        (``name``, ``project``, ``config``, ``retention``, ...) on first use, or
        joined when launched by ``ckptd run`` / ``ckptd resume``.
    """

    def __init__(self, run: Run | None = None, **init_kwargs: Any) -> None:
        super().__init__()
        self._run = run
        self._init_kwargs = init_kwargs
        self._warned: set[str] = set()
        self.checkpoint_io = CkptdCheckpointIO(self)

    @property
    def name(self) -> str:
        return self._init_kwargs.get("name") or (self._run.name if self._run else "ckptd")

    @property
    def version(self) -> str:
        return self.experiment.id

    @property
    @rank_zero_experiment
    def experiment(self) -> Run:
        if self._run is None:
            self._run = init(**self._init_kwargs)
        return self._run

    def resume_path(self) -> str | None:
        """``ckpt_path`` for ``trainer.fit``: the newest adopted checkpoint that
        verifies (a damaged one is skipped, with a warning saying why); None
        on a fresh start, which makes Lightning start from scratch."""
        return self.experiment.latest_checkpoint_path()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        # Lightning adds "epoch" to every dict: kept, it is what per-epoch plots use
        try:
            self.experiment.log(dict(metrics), step=None if step is None else int(step))
        except (TypeError, ValueError) as exc:
            self._warn("log", f"metrics at step {step} not logged: {exc}")

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """One ``hparams`` event with every (flattened) hyperparameter."""
        self.experiment.event("hparams", **flat_params(params))

    @rank_zero_only
    def save(self) -> None:
        """Events are already on their way to the daemon; nothing is buffered here."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Adoptions committed and events durable; the run itself ends at exit
        (or with ``run.finish()``), so ``trainer.test`` after ``fit`` still logs."""
        self.checkpoint_io.wait()
        try:
            self.experiment.flush()
        except CkptdError as exc:
            self._warn("flush", str(exc))

    def _warn(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            print(f"ckptd: {text}", file=sys.stderr)


__all__ = ["CkptdLogger", "CkptdCheckpointIO"]
