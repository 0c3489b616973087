"""Every random number generator a training script depends on, captured and restored.

States are converted to plain lists, ints and uint8 tensors so a checkpoint
that holds them still loads with ``torch.load(weights_only=True)``: no numpy
object is ever pickled. numpy and torch are touched only when the training
script already imported them (the client stays stdlib-only at import).
"""

from __future__ import annotations

import random
import sys
from typing import Any


def seed_everything(seed: int) -> None:
    """Seed python, numpy (if installed) and torch (every CUDA device too)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture() -> dict[str, Any]:
    """The current state of every generator the process has loaded."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss]}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [str(name), [int(k) for k in keys], int(pos), int(has_gauss),
                          float(cached)]
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore(state: dict[str, Any]) -> None:
    """Put every generator back; called last in ``restore()`` so nothing the
    restore itself does (allocations, loads) advances a stream afterwards."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy

        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss,
                                cached))
    if "torch" in state or "cuda" in state:
        import torch

        if "torch" in state:
            torch.set_rng_state(state["torch"].cpu())
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available():
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), device=i)


#: What the misplacement warning tells the user to do.
PLACEMENT_FIX = ("call run.restore() after the model and optimizer are built, right before "
                 "the training loop")


class PlacementWatch:
    """Notices a ``restore()`` placed before the model is built.

    ``restore()`` puts the generators back at once: for the usual placement
    (model and optimizer built, then ``restore()``, then the loop) that is
    exactly the state the checkpoint saw, whatever the loop draws before its
    first ``log()`` (dropout, shuffling). Deferring the restore to the first
    ``log()`` would break that placement, so it is not done. Placed earlier,
    building the model draws its initial weights from the restored generators
    and the loop then starts from another state: the run silently diverges.
    That is what this watches for: a torch parameter created after
    ``restore()`` (a global registration hook, so any ``nn.Module``), and at
    the first ``log()``/``checkpoint()`` the torch generator no longer where
    ``restore()`` left it. Then it warns once, naming the fix. (A model built
    after ``restore()`` without drawing, and a loop that draws, also warns:
    the fix is the same and harmless.)
    """

    def __init__(self, warn: Any) -> None:
        self._warn = warn
        self._built_after = False
        self._handle: Any = None
        torch = sys.modules.get("torch")
        self._restored = None if torch is None else torch.get_rng_state()
        if torch is None:
            return
        hooks = getattr(torch.nn.modules.module, "register_module_parameter_registration_hook",
                        None)
        if hooks is not None:
            self._handle = hooks(self._on_parameter)

    def _on_parameter(self, module: Any, name: str, param: Any) -> None:
        self._built_after = True
        self._remove()  # one is enough; keep module construction at full speed

    def _remove(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.remove()

    def check(self) -> None:
        """At the first ``log()``/``checkpoint()`` after ``restore()``: warn if misplaced."""
        self._remove()
        if not self._built_after or self._restored is None:
            return
        torch = sys.modules["torch"]
        if torch.equal(torch.get_rng_state(), self._restored):
            return
        self._warn(f"restore() ran before the model was built: building it drew from the "
                   f"random generators restore() had just put back, so this resumed run will "
                   f"not be bit-identical to an uninterrupted one; {PLACEMENT_FIX}")
