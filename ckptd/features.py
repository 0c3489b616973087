"""Importing this module registers every RPC handler and daemon hook."""

from . import (
    autoresume,  # noqa: F401
    checkpoints,  # noqa: F401
    control,  # noqa: F401
    dcp_commit,  # noqa: F401
    sysmetrics,  # noqa: F401
)
