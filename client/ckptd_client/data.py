"""Reproducible data order across a resume: a shuffling sampler you can checkpoint.

A resumed run is bit-identical to an uninterrupted one only if it sees the
same batches in the same order. ``DataLoader(shuffle=True)`` draws a new
permutation from the global RNG each epoch and keeps its position inside
its iterator, which no checkpoint holds. :class:`ResumableSampler` keeps
both where a checkpoint can reach them::

    from ckptd_client.data import ResumableSampler

    loader, sampler = resumable_loader(dataset, batch_size=32, seed=0)

    state = run.restore()
    if state is not None:
        model.load_state_dict(state["model"])
        sampler.load_state_dict(state["sampler"])    # same epoch, same position

    for batch in loader:          # after a restore: the rest of the interrupted epoch
        ...
        run.checkpoint({"model": model.state_dict(),
                        "sampler": sampler.state_dict(), ...}, step=step)

:func:`resumable_loader` builds the ``DataLoader`` with the sampler and
with a generator of its own. That matters: a ``DataLoader`` draws a seed
from its generator each time an epoch starts, and without one it draws from
torch's global generator, which dropout also uses. A resumed run starts its
epoch at a different moment than the uninterrupted one did, so that draw
would shift every dropout mask after the resume.

The sampler's state is the epoch, the generator state the epoch's permutation was
drawn from, and how many samples of that epoch were handed out. With
``num_workers=0`` that count is exactly what training consumed. With
worker processes the loader fetches ahead: pass what training actually
consumed, ``sampler.state_dict(consumed=batches_this_epoch * batch_size)``.

The state holds only ints and a uint8 tensor, so it loads with
``torch.load(weights_only=True)``. torch is imported when the sampler is
first iterated, not when this module is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class ResumableSampler:
    """Shuffles ``range(n)`` anew each epoch; checkpointable mid-epoch."""

    def __init__(self, n: int, seed: int = 0) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, not {n!r}")
        self.n = n
        self.seed = seed
        self.epoch = 0
        self.position = 0  # samples of this epoch handed out
        self._generator: Any = None
        self._epoch_state: Any = None  # generator state this epoch's order came from
        self._drawn = False  # the generator has moved past this epoch's draw

    def __len__(self) -> int:
        return self.n

    def _gen(self) -> Any:
        if self._generator is None:
            import torch

            self._generator = torch.Generator()
            self._generator.manual_seed(self.seed)
        return self._generator

    def __iter__(self) -> Iterator[int]:
        import torch

        gen = self._gen()
        if self._epoch_state is not None and self.position >= self.n:
            if not self._drawn:
                # restored at an epoch's end: redo that epoch's draw so the
                # generator stands where the uninterrupted run's stood
                torch.randperm(self.n, generator=gen)
            self.epoch += 1
            self._epoch_state = None
        if self._epoch_state is None:
            self.position = 0
            self._epoch_state = gen.get_state()
        else:
            gen.set_state(self._epoch_state)  # the same order as before the interruption
        order = torch.randperm(self.n, generator=gen).tolist()
        self._drawn = True
        for i in order[self.position:]:
            self.position += 1
            yield i

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """What resumes the order exactly; ``consumed`` overrides the position
        (samples of this epoch training has used, when workers fetch ahead)."""
        if self._epoch_state is None:
            self._epoch_state = self._gen().get_state()
        position = self.position if consumed is None else int(consumed)
        return {"epoch": self.epoch, "position": position, "seed": self.seed, "n": self.n,
                "epoch_generator": self._epoch_state.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(f"sampler state is for {state['n']} samples, this dataset has "
                             f"{self.n}; the data changed since the checkpoint")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._epoch_state = state["epoch_generator"].clone()
        self._gen().set_state(self._epoch_state)
        self._drawn = False


def resumable_loader(dataset: Any, batch_size: int = 1, *, seed: int = 0,
                     **kwargs: Any) -> tuple[Any, ResumableSampler]:
    """A ``DataLoader`` over ``dataset`` whose order a checkpoint can resume,
    and the sampler to checkpoint. ``kwargs`` go to ``DataLoader`` (not
    ``shuffle``, ``sampler`` or ``generator``: those are what this sets)."""
    import torch
    from torch.utils.data import DataLoader

    for key in ("shuffle", "sampler", "generator"):
        if key in kwargs:
            raise TypeError(f"resumable_loader() sets {key} itself")
    sampler = ResumableSampler(len(dataset), seed=seed)
    # Its own generator: starting an epoch must not draw from the global one.
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator,
                        **kwargs)
    return loader, sampler


__all__ = ["ResumableSampler", "resumable_loader"]
