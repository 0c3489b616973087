"""Retention policies are pure: a list of checkpoints in, a list of bools out."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptd.retention import AnyOf, BestN, EveryN, KeepAll, LatestN, from_dict, to_delete


def ckpts(*steps: int, losses: dict[int, float] | None = None) -> list[dict]:
    return [{"step": s, "metrics": {"loss": losses[s]} if losses and s in losses else {}}
            for s in steps]


def kept(policy, checkpoints) -> list[int]:
    return [c["step"] for c, k in zip(checkpoints, policy.keep(checkpoints), strict=True) if k]


def test_latest_n_keeps_the_highest_steps() -> None:
    assert kept(LatestN(2), ckpts(1, 2, 3, 4)) == [3, 4]
    assert kept(LatestN(0), ckpts(1, 2)) == []
    assert kept(LatestN(5), ckpts(1, 2)) == [1, 2]


def test_best_n_by_min_or_max_keeps_unjudged_ones() -> None:
    cs = ckpts(1, 2, 3, 4, 5, losses={1: 3.0, 2: 1.0, 3: 2.0, 4: math.nan})
    assert kept(BestN("loss", 1), cs) == [2, 4, 5]  # 4 (NaN) and 5 (missing) cannot be judged
    assert kept(BestN("loss", 2, mode="max"), cs) == [1, 3, 4, 5]


def test_best_n_ties_go_to_the_newer_step() -> None:
    cs = ckpts(1, 2, 3, losses={1: 1.0, 2: 1.0, 3: 1.0})
    assert kept(BestN("loss", 1), cs) == [3]


def test_every_n_keeps_multiples() -> None:
    assert kept(EveryN(3), ckpts(1, 3, 5, 6, 9, 10)) == [3, 6, 9]


def test_composition_is_a_union() -> None:
    policy = LatestN(1) | EveryN(4) | BestN("loss", 1)
    cs = ckpts(2, 4, 5, 8, 9, losses={2: 0.1, 4: 1.0, 5: 1.0, 8: 1.0, 9: 1.0})
    assert kept(policy, cs) == [2, 4, 8, 9]
    assert isinstance(policy, AnyOf) and len(policy.policies) == 3


def test_dict_round_trip_and_plain_dicts() -> None:
    policy = LatestN(3) | BestN("val", 2, "max") | EveryN(100)
    assert from_dict(policy.to_dict()) == policy
    assert from_dict({"latest": 3}) == LatestN(3)
    assert from_dict(None) == KeepAll()
    assert from_dict({"latest": 2, "every": 10}) == AnyOf(LatestN(2), EveryN(10))


@pytest.mark.parametrize("bad", [{"latest": -1}, {"nope": 1}, {"best": {"metric": "x",
                                                                         "mode": "median"}},
                                 {"every": 0}, [], "latest", {"any": []}])
def test_bad_specs_are_refused_with_a_message(bad) -> None:
    with pytest.raises(ValueError):
        from_dict(bad)


def test_to_delete_never_deletes_the_newest() -> None:
    assert to_delete(LatestN(0), ckpts(1, 2, 3)) == [1, 2]
    assert to_delete(BestN("loss", 1), ckpts(1, 2, losses={1: 0.0, 2: 9.0})) == []
    assert to_delete(LatestN(0), []) == []


@given(st.lists(st.integers(0, 10_000), unique=True, max_size=30), st.integers(0, 5),
       st.integers(1, 50))
def test_policies_agree_with_their_definitions(steps: list[int], n: int, every: int) -> None:
    cs = ckpts(*sorted(steps))
    latest = set(sorted(steps)[-n:]) if n else set()
    assert set(kept(LatestN(n), cs)) == latest
    assert kept(EveryN(every), cs) == [s for s in sorted(steps) if s % every == 0]
    deleted = set(to_delete(LatestN(n) | EveryN(every), cs))
    assert deleted == {s for s in steps if s % every} - latest - {max(steps, default=-1)}
