"""``SummaryWriter`` with TensorBoard's signature, writing into a ckptd run.

``from ckptd_client.tensorboard import SummaryWriter`` is the only change a
script written for ``torch.utils.tensorboard`` needs: scalars become run
metrics (durable, resumable, ``ckptd tail``), text becomes run events, and
hyperparameters are recorded as an event plus their metrics. Standard
library only: no tensorboard install is needed to log.

Methods that have no ckptd counterpart (images, histograms, graphs, ...)
are accepted and ignored with one warning each, so an unmodified script
never dies on them (SPEC promise 4).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..run import Run, init

#: TensorBoard writes ``global_step=None`` as step 0; so do we (same values).
DEFAULT_STEP = 0


def _number(value: Any) -> Any:
    """A TensorBoard scalar (float, int, numpy scalar, 0-d tensor) as a plain number."""
    item = getattr(value, "item", None)
    return item() if item is not None else value


def _step(global_step: Any) -> int:
    return DEFAULT_STEP if global_step is None else int(_number(global_step))


class SummaryWriter:
    """A drop-in for ``torch.utils.tensorboard.SummaryWriter``.

    :param log_dir: becomes the run name (TensorBoard names runs by folder)
        when this writer starts the run itself.
    :param run: log into this run instead of starting one (its caller
        finishes it; ``close()`` then only flushes).
    """

    def __init__(self, log_dir: str | None = None, comment: str = "", purge_step: Any = None,
                 max_queue: int = 10, flush_secs: int = 120, filename_suffix: str = "",
                 *, run: Run | None = None, **init_kwargs: Any) -> None:
        self._owns = run is None
        if run is None:
            name = os.path.basename(os.path.normpath(log_dir)) + comment if log_dir else None
            run = init(name=name or None, **init_kwargs)
        self.run = run
        self.log_dir = log_dir
        self._warned: set[str] = set()

    # ---------------------------------------------------------- what maps

    def add_scalar(self, tag: str, scalar_value: Any, global_step: Any = None,
                   walltime: float | None = None, new_style: bool = False,
                   double_precision: bool = False) -> None:
        """One metric ``tag`` at ``global_step``."""
        self.run.log({tag: _number(scalar_value)}, step=_step(global_step))

    def add_scalars(self, main_tag: str, tag_scalar_dict: dict[str, Any],
                    global_step: Any = None, walltime: float | None = None) -> None:
        """Several metrics as ``main_tag/tag`` (TensorBoard's run-per-tag layout, flattened)."""
        self.run.log({f"{main_tag}/{k}": _number(v) for k, v in tag_scalar_dict.items()},
                     step=_step(global_step))

    def add_text(self, tag: str, text_string: str, global_step: Any = None,
                 walltime: float | None = None) -> None:
        """A run event (``ckptd tail`` shows it) carrying the tag and step."""
        self.run.event(text_string, tag=tag, step=_step(global_step))

    def add_hparams(self, hparam_dict: dict[str, Any], metric_dict: dict[str, Any],
                    hparam_domain_discrete: Any = None, run_name: str | None = None,
                    global_step: Any = None) -> None:
        """The hyperparameters as one ``hparams`` event, their metrics as metrics."""
        self.run.event("hparams", **{str(k): _number(v) for k, v in hparam_dict.items()})
        if metric_dict:
            self.run.log({k: _number(v) for k, v in metric_dict.items()},
                         step=_step(global_step))

    def flush(self) -> None:
        """Everything added so far is durable (``Run.flush``)."""
        self.run.flush()

    def close(self) -> None:
        """Flush; finish the run when this writer started it."""
        if self._owns:
            self.run.finish()
        else:
            self.run.flush()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def get_logdir(self) -> str | None:
        return self.log_dir

    # --------------------------------------------------- what does not map

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("add_"):
            raise AttributeError(name)

        def ignored(*args: Any, **kwargs: Any) -> None:
            if name not in self._warned:
                self._warned.add(name)
                print(f"ckptd: SummaryWriter.{name} is not recorded by ckptd (scalars, text "
                      f"and hparams are); ignoring it", file=sys.stderr)

        return ignored


__all__ = ["SummaryWriter", "DEFAULT_STEP"]
