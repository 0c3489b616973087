"""Importing this module registers every RPC handler and daemon hook."""

from . import (
    adopt,  # noqa: F401
    autoresume,  # noqa: F401
    checkpoints,  # noqa: F401
    console,  # noqa: F401
    control,  # noqa: F401
    dcp_commit,  # noqa: F401
    manage,  # noqa: F401
    sysmetrics,  # noqa: F401
)
from .analysis import sweep  # noqa: F401
