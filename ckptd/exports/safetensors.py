"""``ckptd ckpt export --format safetensors``: a checkpoint's tensors as one safetensors file.

safetensors holds flat named tensors only, so the state tree is flattened to
dotted names (``model.layer.weight``, lists by index) and everything that is
not a tensor (step, metrics, numbers and strings in the state) goes into the
header's string metadata as JSON. RNG states are left out: they are for
resuming in ckptd, not for another framework.
"""

from __future__ import annotations

import json
from typing import Any

from ckptd_client.errors import CkptdError

from ckptd.exports import need

#: The metadata key holding the non-tensor leaves, as JSON.
EXTRA_KEY = "ckptd.extra"


def flatten(tree: Any, prefix: str, tensors: dict[str, Any], extra: dict[str, Any]) -> None:
    import torch

    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().contiguous()
    elif isinstance(tree, dict):
        for k, v in tree.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors, extra)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            flatten(v, f"{prefix}.{i}" if prefix else str(i), tensors, extra)
    else:
        extra[prefix] = tree


def write(obj: dict[str, Any], f: Any) -> None:
    """``checkpoints.export``'s writer: ``obj`` holds ``state``, ``run``, ``step``, ``metrics``."""
    st = need("safetensors.torch", "ckpt export --format safetensors")
    tensors: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    flatten(obj["state"], "", tensors, extra)
    if not tensors:
        raise CkptdError(f"ckpt export: step {obj['step']} of run {obj['run']} holds no "
                         "tensors; use --format torch")
    metadata = {"format": "ckptd-export/1", "run": str(obj["run"]), "step": str(obj["step"]),
                "metrics": json.dumps(obj.get("metrics") or {}),
                EXTRA_KEY: json.dumps(extra, default=repr)}
    f.write(st.save(tensors, metadata=metadata))
