"""Importing this module registers every RPC handler and daemon hook."""

from . import checkpoints  # noqa: F401
from . import control  # noqa: F401
