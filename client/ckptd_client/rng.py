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
