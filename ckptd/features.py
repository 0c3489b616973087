"""Importing this module registers every RPC handler and daemon hook."""

from . import (
    autoresume,  # noqa: F401
    checkpoints,  # noqa: F401
    control,  # noqa: F401
    manage,  # noqa: F401
    sysmetrics,  # noqa: F401
)
