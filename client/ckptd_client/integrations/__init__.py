"""Adapters for code written against other tools (TensorBoard, Lightning, Hugging Face).

Each module imports its framework only when it is imported itself, so
``import ckptd_client`` stays standard-library only. The public import paths
are the thin modules ``ckptd_client.tensorboard``, ``ckptd_client.lightning``
and ``ckptd_client.hf``.
"""

from __future__ import annotations


def require(module: str, extra: str) -> None:
    """Fail with one line naming the ``pip install`` when an optional framework is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"ckptd_client needs {module!r} for this integration: "
                          f"pip install 'ckptd[{extra}]'")
