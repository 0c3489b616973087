"""Which checkpoints to keep: pure policies, no I/O (the daemon applies them).

A policy answers ``keep(checkpoints) -> list[bool]`` for checkpoints given
oldest first, each a mapping with at least ``"step"`` and ``"metrics"``.
Policies compose like Orbax's preservation policies: ``a | b`` (or
``AnyOf(a, b)``) keeps what either keeps. The daemon adds one rule no policy
can override: the newest committed checkpoint is always kept, and nothing is
deleted until a newer checkpoint has been committed.

At ``init()`` a policy travels as a plain dict (``policy.to_dict()``), so the
training process never imports this module unless it wants the classes::

    from ckptd.retention import BestN, EveryN, LatestN
    ckptd_client.init(retention=LatestN(3) | BestN("val_loss", 2) | EveryN(10_000))
    ckptd_client.init(retention={"any": [{"latest": 3}, {"every": 10000}]})  # same idea

In the CLI: ``ckptd show RUN`` prints the run's policy, ``ckptd ckpt gc RUN``
applies it now.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class Policy:
    """Base of every retention policy."""

    def keep(self, checkpoints: Sequence[Mapping[str, Any]]) -> list[bool]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __or__(self, other: Policy) -> Policy:
        return AnyOf(self, other)


@dataclass(frozen=True)
class KeepAll(Policy):
    """Keep every checkpoint (the default: ckptd never deletes unasked)."""

    def keep(self, checkpoints: Sequence[Mapping[str, Any]]) -> list[bool]:
        return [True] * len(checkpoints)

    def to_dict(self) -> dict[str, Any]:
        return {"all": True}


@dataclass(frozen=True)
class LatestN(Policy):
    """Keep the ``n`` checkpoints with the highest steps."""

    n: int

    def __post_init__(self) -> None:
        _check_count("LatestN", self.n)

    def keep(self, checkpoints: Sequence[Mapping[str, Any]]) -> list[bool]:
        order = sorted(range(len(checkpoints)), key=lambda i: checkpoints[i]["step"])
        kept = set(order[max(0, len(order) - self.n):]) if self.n else set()
        return [i in kept for i in range(len(checkpoints))]

    def to_dict(self) -> dict[str, Any]:
        return {"latest": self.n}


@dataclass(frozen=True)
class BestN(Policy):
    """Keep the ``n`` checkpoints with the best value of ``metric``.

    ``mode`` is ``"min"`` (lower is better, e.g. a loss) or ``"max"``. A
    checkpoint that did not record the metric (or recorded NaN) is kept:
    it cannot be judged, and deleting what cannot be judged loses data.
    Ties go to the newer step.
    """

    metric: str
    n: int = 1
    mode: str = "min"

    def __post_init__(self) -> None:
        _check_count("BestN", self.n)
        if self.mode not in ("min", "max"):
            raise ValueError(f"BestN mode must be 'min' or 'max', not {self.mode!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError("BestN needs a metric name")

    def keep(self, checkpoints: Sequence[Mapping[str, Any]]) -> list[bool]:
        scored = []
        out = []
        for i, c in enumerate(checkpoints):
            value = (c.get("metrics") or {}).get(self.metric)
            judged = isinstance(value, (int, float)) and not isinstance(value, bool) \
                and not math.isnan(value)
            out.append(not judged)
            if judged:
                scored.append((value if self.mode == "min" else -value, -c["step"], i))
        for _, _, i in sorted(scored)[: self.n]:
            out[i] = True
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"best": {"metric": self.metric, "n": self.n, "mode": self.mode}}


@dataclass(frozen=True)
class EveryN(Policy):
    """Keep checkpoints whose step is a multiple of ``n`` (long-term milestones)."""

    n: int

    def __post_init__(self) -> None:
        _check_count("EveryN", self.n)
        if self.n == 0:
            raise ValueError("EveryN needs n >= 1")

    def keep(self, checkpoints: Sequence[Mapping[str, Any]]) -> list[bool]:
        return [c["step"] % self.n == 0 for c in checkpoints]

    def to_dict(self) -> dict[str, Any]:
        return {"every": self.n}


class AnyOf(Policy):
    """Keep a checkpoint when any of the policies keeps it."""

    def __init__(self, *policies: Policy) -> None:
        flat: list[Policy] = []
        for p in policies:
            if not isinstance(p, Policy):
                raise TypeError(f"AnyOf takes policies, not {type(p).__name__}")
            flat.extend(p.policies if isinstance(p, AnyOf) else [p])
        self.policies = tuple(flat)

    def keep(self, checkpoints: Sequence[Mapping[str, Any]]) -> list[bool]:
        out = [False] * len(checkpoints)
        for p in self.policies:
            out = [a or b for a, b in zip(out, p.keep(checkpoints), strict=True)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"any": [p.to_dict() for p in self.policies]}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnyOf) and other.policies == self.policies

    def __hash__(self) -> int:
        return hash(self.policies)

    def __repr__(self) -> str:
        return f"AnyOf{self.policies!r}"


def from_dict(spec: Any) -> Policy:
    """Parse a policy as stored in the run (``to_dict`` output, or a user's dict).

    A dict with several keys is the union of them, so
    ``{"latest": 3, "every": 1000}`` means ``LatestN(3) | EveryN(1000)``.

    :raises ValueError: naming what is wrong with ``spec``.
    """
    if spec is None:
        return KeepAll()
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"retention {spec!r} is not a policy; use e.g. {{'latest': 3}}")
    parts: list[Policy] = []
    for key, value in spec.items():
        if key == "latest":
            parts.append(LatestN(value))
        elif key == "every":
            parts.append(EveryN(value))
        elif key == "best":
            if not isinstance(value, Mapping):
                raise ValueError("retention 'best' needs {'metric': ..., 'n': ..., 'mode': ...}")
            unknown = set(value) - {"metric", "n", "mode"}
            if unknown:
                raise ValueError(f"retention 'best' has unknown fields {sorted(unknown)}")
            parts.append(BestN(value.get("metric"), value.get("n", 1), value.get("mode", "min")))
        elif key == "any":
            if not isinstance(value, list) or not value:
                raise ValueError("retention 'any' needs a non-empty list of policies")
            parts.extend(from_dict(v) for v in value)
        elif key == "all":
            parts.append(KeepAll())
        else:
            raise ValueError(f"unknown retention rule {key!r}; use latest, best, every or any")
    return parts[0] if len(parts) == 1 else AnyOf(*parts)


def to_delete(policy: Policy, checkpoints: Sequence[Mapping[str, Any]]) -> list[int]:
    """Steps to delete among committed ``checkpoints`` (oldest first).

    The newest one is never among them, whatever the policy says.
    """
    if not checkpoints:
        return []
    keep = policy.keep(checkpoints)
    newest = max(range(len(checkpoints)), key=lambda i: checkpoints[i]["step"])
    keep[newest] = True
    return [c["step"] for c, k in zip(checkpoints, keep, strict=True) if not k]


def _check_count(name: str, n: Any) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{name} needs a non-negative int, not {n!r}")


__all__ = ["Policy", "KeepAll", "LatestN", "BestN", "EveryN", "AnyOf", "from_dict", "to_delete"]
