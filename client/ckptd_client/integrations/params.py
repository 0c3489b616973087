"""Hyperparameters from a framework (Lightning's ``hparams``, HF's
``TrainingArguments``) as the fields of one ``hparams`` run event."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from typing import Any


def flat_params(params: Any, prefix: str = "") -> dict[str, Any]:
    """Hyperparameters (dict, Namespace, nested) as ``a/b`` keys of plain values,
    the form every ckptd view and export shows."""
    if isinstance(params, Namespace):
        params = vars(params)
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, name + "/"))
        elif value is None or isinstance(value, (str, int, float, bool)):
            out[name] = value
        else:
            out[name] = str(value)  # modules, callables, dtypes: their repr says enough
    return out
