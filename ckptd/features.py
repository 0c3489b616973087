"""Importing this module registers every RPC handler and daemon hook."""

from . import control  # noqa: F401
