"""Hugging Face ``Trainer``: a ``TrainerCallback`` that logs into a ckptd run and
hands every ``checkpoint-N`` folder to the daemon.

    ckptd_cb = CkptdCallback(name="gpt2-tiny")
    trainer = Trainer(..., callbacks=[ckptd_cb])
    trainer.train(resume_from_checkpoint=ckptd_cb.resume_path())

Everything ``Trainer`` logs (loss, learning rate, grad norm, eval metrics,
the closing runtime numbers) becomes run metrics at ``state.global_step``;
``TrainingArguments`` become one ``hparams`` event. Each saved
``checkpoint-N`` is adopted (``run.adopt_checkpoint``: copied, fsynced,
hashed, retained by the daemon) while training goes on. ``resume_path()``
is the newest adopted copy that still verifies, and Trainer restores its own
optimizer, scheduler, RNG and data position from it. Imported only by users
who have transformers (``ckptd[hf]``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from . import require

require("transformers", "hf")

from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

from ..errors import CkptdError  # noqa: E402
from ..run import Run, init  # noqa: E402
from .adopt import AdoptHandle  # noqa: E402
from .params import flat_params  # noqa: E402


class CkptdCallback(TrainerCallback):
    """Logs and adopts for ``Trainer`` on the main process (rank 0).

    :param run: log into this run; otherwise one is started with ``init_kwargs``
        (``name``, ``project``, ``retention``, ...) on first use, or joined
        when launched by ``ckptd run`` / ``ckptd resume``.
    """

    def __init__(self, run: Run | None = None, **init_kwargs: Any) -> None:
        self._run = run
        self._init_kwargs = init_kwargs
        self._pending: list[AdoptHandle] = []
        self._warned: set[str] = set()

    @property
    def run(self) -> Run:
        if self._run is None:
            self._run = init(**self._init_kwargs)
        return self._run

    def resume_path(self) -> str | None:
        """``resume_from_checkpoint`` for ``trainer.train``: the newest adopted
        ``checkpoint-N`` that verifies (a damaged one is skipped, with a warning
        saying why); None on a fresh start, which trains from scratch."""
        return self.run.latest_checkpoint_path()

    # --------------------------------------------------------- Trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.run.event("hparams", **flat_params(args.to_dict()))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        # Trainer's logs mix numbers with the odd string; the numbers are the metrics
        numbers = {k: v for k, v in logs.items()
                   if isinstance(v, (int, float)) or getattr(v, "ndim", None) == 0}
        try:
            self.run.log(numbers, step=state.global_step)
        except (TypeError, ValueError) as exc:  # never kills training (SPEC promise 4)
            self._warn("log", f"logs at step {state.global_step} not recorded: {exc}")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Trainer saves right after this (DefaultFlowCallback, first in the list,
        # has set should_save) and, with save_total_limit, deletes old folders
        # then: an adoption still copying one of them must finish first
        if control.should_save:
            self.wait()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:
            self.wait()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        # Trainer's own naming; its files are complete (and rotated) by on_save
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        try:
            self._pending.append(self.run.adopt_checkpoint(folder, state.global_step))
        except (CkptdError, ValueError) as exc:
            self._warn("adopt", f"{folder} not adopted: {exc}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.wait()
        try:
            self.run.flush()
        except CkptdError as exc:
            self._warn("flush", str(exc))

    # ----------------------------------------------------------------- internals

    def wait(self, timeout: float | None = None) -> None:
        """Every adoption started so far has committed (or failed, with a warning)."""
        pending, self._pending = self._pending, []
        for handle in pending:
            try:
                handle.wait(timeout)
            except CkptdError as exc:
                self._warn("adopt", f"checkpoint step {handle.step} not adopted: {exc}")

    def _warn(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            print(f"ckptd: {text}", file=sys.stderr)


__all__ = ["CkptdCallback"]
