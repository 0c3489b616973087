"""ckptd's client: ``import ckptd_client as ckptd; run = ckptd.init(...)``.

Importing this package loads only the standard library; torch and numpy are
touched only when the training script already uses them.
"""

from __future__ import annotations

from .errors import CheckpointError, CkptdError, DaemonUnavailable, DiskFull, NotFound
from .run import Run, init, is_worker

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CkptdError",
    "DaemonUnavailable",
    "DiskFull",
    "NotFound",
    "Run",
    "init",
    "is_worker",
]
