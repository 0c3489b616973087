"""``ckptd compare``: is B better than A, or is that the seed?

A side is one run (id, prefix or name), a group (``@G``) or a filter
(``config.lr=3e-4``, several joined by ``,``). Each run of a side gives one
number: its metric ``--key`` at the ``final`` step, at its ``best`` value, or at
``step=N`` of its effective timeline. The sides are then summarized and judged
by :mod:`.stats`; no winner is called when a side has fewer than
:data:`stats.MIN_N` runs or when the 95% intervals overlap.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ckptd_client.errors import CkptdError, NotFound

from ckptd.analysis import stats
from ckptd.store.query import Reader

#: Key names that are "higher is better" when the user did not say.
HIGHER_WORDS = re.compile(r"(acc|accuracy|reward|return|score|f1|auc|precision|recall|bleu|"
                          r"rouge|map|iou|top\d)", re.I)
#: Provenance facts that should be the same across the runs of one side.
SAME_WITHIN = ("git_commit", "git_diff_hash", "packages_hash", "python", "torch", "cuda")
#: Seed-like config keys: they are expected to differ within a side.
SEED_KEYS = {"seed", "run_seed"}
#: How many runs per side a refusal asks for.
ENOUGH = 5


class CompareError(CkptdError):
    """The comparison cannot be made as asked (no such metric, empty side)."""


@dataclass
class Side:
    label: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    used: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_at(at: str) -> tuple[str, int | None]:
    if at in ("final", "best"):
        return at, None
    m = re.fullmatch(r"step=(\d+)", at)
    if not m:
        raise CompareError(f"--at {at!r}: use final, best or step=N")
    return "step", int(m.group(1))


def parse_filter(text: str) -> list[tuple[str, str]]:
    """``config.lr=3e-4,group=a`` -> ``[("config.lr", "3e-4"), ("group", "a")]``."""
    out = []
    for part in text.split(","):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise CompareError(f"filter {text!r}: write KEY=VALUE (e.g. config.lr=3e-4)")
        out.append((k.strip(), v.strip()))
    return out


def _loads(text: Any) -> Any:
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError:
        return {}


def field_of(run: dict[str, Any], key: str) -> Any:
    if key.startswith("config."):
        return _loads(run.get("config")).get(key[7:])
    if key == "group":
        return run.get("group_name")
    if key in ("project", "name", "status", "seed", "id"):
        return run.get(key)
    raise CompareError(f"filter key {key!r}: use config.NAME, group, project, name, status "
                       "or seed")


def same_value(actual: Any, wanted: str) -> bool:
    if actual is None:
        return wanted.lower() in ("none", "null", "")
    try:
        return float(actual) == float(wanted)  # 3e-4 matches 0.0003
    except (TypeError, ValueError):
        return str(actual) == wanted


def matches(run: dict[str, Any], conds: list[tuple[str, str]]) -> bool:
    return all(same_value(field_of(run, k), v) for k, v in conds)


def resolve_side(reader: Reader, spec: str, where: list[tuple[str, str]]) -> Side:
    """The runs of one side: ``@group``, a ``KEY=VALUE`` filter, or one run."""
    side = Side(spec)
    if spec.startswith("@"):
        group = spec[1:]
        runs = reader.rows("SELECT * FROM runs WHERE group_name = ? ORDER BY started, rowid",
                           (group,))
        if not runs:
            raise NotFound(f"compare: no runs in group {group!r}; `ckptd ls --json` shows "
                           "each run's group")
    elif "=" in spec:
        conds = parse_filter(spec)
        runs = [r for r in reader.rows("SELECT * FROM runs ORDER BY started, rowid")
                if matches(r, conds)]
        if not runs:
            raise NotFound(f"compare: no run matches {spec!r}")
    else:
        side.runs = [reader.resolve(spec)]  # named on purpose: used whatever its state
        return side
    runs = [r for r in runs if matches(r, where)]
    done = [r for r in runs if r["status"] == "finished"]
    if len(done) < len(runs):
        side.notes.append(f"{spec}: {len(runs) - len(done)} run(s) not finished, left out")
    side.runs = done
    return side


def value_of(reader: Reader, run: dict[str, Any], key: str, at: str, step: int | None,
             higher: bool) -> float | None:
    rows = reader.metrics(run["id"], key)
    values = [(r["step"], r["value"]) for r in rows]
    if not values:
        return None
    if at == "final":
        return values[-1][1]
    if at == "best":
        finite = [v for _, v in values if not math.isnan(v)]
        return (max(finite) if higher else min(finite)) if finite else math.nan
    found = [v for s, v in values if s == step]
    return found[-1] if found else None


def guess_higher(key: str) -> bool:
    return bool(HIGHER_WORDS.search(key.rsplit("/", 1)[-1]))


def compare(reader: Reader, specs: list[str], key: str, *, at: str = "final",
            higher: bool | None = None, where: str | None = None,
            resamples: int = stats.RESAMPLES, seed: int = stats.SEED) -> dict[str, Any]:
    """Judge the sides; the dict is what ``--json`` prints."""
    if len(specs) < 2:
        raise CompareError("compare: give at least two sides (a run, @group or KEY=VALUE)")
    how, step = parse_at(at)
    conds = parse_filter(where) if where else []
    notes: list[str] = []
    assumed = higher is None
    if higher is None:
        higher = guess_higher(key)
    if assumed:
        notes.append(f"assuming {'higher' if higher else 'lower'} {key} is better (from its "
                     "name); say --higher-is-better or --lower-is-better")
    sides = [resolve_side(reader, s, conds) for s in specs]
    for side in sides:
        for run in side.runs:
            v = value_of(reader, run, key, how, step, higher)
            if v is None:
                side.notes.append(f"{side.label}: run {run['id']} has no {key}"
                                  + (f" at step {step}" if how == "step" else "") + ", left out")
            elif math.isnan(v):
                side.notes.append(f"{side.label}: run {run['id']} has {key} = NaN, left out")
            else:
                side.values.append(v)
                side.used.append(run)
        notes.extend(side.notes)
        if not side.values:
            raise CompareError(f"compare: {side.label} has no finished run with a {key} value"
                               + (f" at step {step}" if how == "step" else "")
                               + "; `ckptd keys RUN` / `ckptd metrics RUN` show what was logged")
    out_sides = []
    for side in sides:
        summary = stats.summarize(side.values, resamples=resamples, seed=seed)
        out_sides.append({"side": side.label, "runs": [r["id"] for r in side.used],
                          "values": side.values, **summary})
    verdict, winner = judge(out_sides, higher)
    for s in out_sides:
        s["verdict"] = ("not enough runs" if s["n"] < stats.MIN_N else
                        "better" if s["side"] == winner else
                        "worse" if winner is not None else "no winner")
    base = sides[0]
    diffs = []
    for other in sides[1:]:
        a, b = base.values, other.values
        diff = {"a": base.label, "b": other.label, "diff": stats.mean(a) - stats.mean(b),
                "p_better": stats.prob_better(a, b, higher=higher)}
        if len(a) >= 2 and len(b) >= 2:
            diff["ci95"] = list(stats.bootstrap_pair(
                a, b, lambda x, y: stats.mean(x) - stats.mean(y), resamples=resamples,
                seed=seed))
            diff["p_better_ci95"] = list(stats.bootstrap_pair(
                a, b, lambda x, y: stats.prob_better(x, y, higher=higher),
                resamples=resamples, seed=seed))
        else:
            diff["ci95"] = diff["p_better_ci95"] = None
        diffs.append(diff)
    return {"key": key, "at": at, "higher_is_better": higher, "resamples": resamples,
            "seed": seed, "sides": out_sides, "differences": diffs, "winner": winner,
            "verdict": verdict, "config_diff": config_diff(sides),
            "warnings": warnings(sides), "notes": notes}


def judge(sides: list[dict[str, Any]], higher: bool) -> tuple[str, str | None]:
    """A plain-language verdict and the winner's label, or None when the data cannot tell."""
    small = [s for s in sides if s["n"] < stats.MIN_N]
    if small:
        ns = {s["n"] for s in small}
        if len(small) == len(sides) and len(ns) == 1:
            n = ns.pop()
            who = f"{n} seed{'s' if n != 1 else ''} per side"
        else:
            who = ", ".join(f"{s['n']} on {s['side']}" for s in small)
        more = ENOUGH - min(s["n"] for s in small)
        return f"{who}: not enough to tell; run {more} more", None
    ranked = sorted(sides, key=lambda s: s["mean"], reverse=higher)
    best = ranked[0]
    close = [s for s in ranked[1:] if stats.overlap(best["ci95"], s["ci95"])]
    if close:
        names = ", ".join(s["side"] for s in close)
        return (f"no winner: the 95% intervals of {best['side']} and {names} overlap; the "
                "difference may be seed noise (more seeds narrow the intervals)"), None
    return (f"{best['side']} is better: its 95% interval of the mean "
            f"[{best['ci95'][0]:.4g}, {best['ci95'][1]:.4g}] overlaps no other side's"), \
        best["side"]


def config_diff(sides: list[Side]) -> dict[str, dict[str, list[Any]]]:
    """The config keys whose values differ between sides (the seed left out)."""
    per_side: dict[str, dict[str, set[str]]] = {}
    for side in sides:
        for run in side.used:
            for k, v in _loads(run.get("config")).items():
                if k not in SEED_KEYS:
                    per_side.setdefault(k, {}).setdefault(side.label, set()).add(
                        json.dumps(v, sort_keys=True))
    out = {}
    for k, by_side in per_side.items():
        sets = [by_side.get(s.label, {"(unset)"}) for s in sides]
        if any(x != sets[0] for x in sets[1:]):
            out[k] = {s.label: [json.loads(v) for v in sorted(by_side.get(s.label, ()))]
                      for s in sides}
    return out


def warnings(sides: list[Side]) -> list[str]:
    """What differs inside a side besides the seed: that side is not one config."""
    out = []
    for side in sides:
        if len(side.used) < 2:
            continue
        for fact in SAME_WITHIN:
            seen = {(_loads(r.get("provenance")) or {}).get(fact) for r in side.used}
            if len(seen) > 1:
                out.append(f"{side.label}: runs differ in {fact} ({len(seen)} values)")
        sizes = {r.get("world_size") for r in side.used}
        if len(sizes) > 1:
            out.append(f"{side.label}: runs differ in world size {sorted(map(str, sizes))}")
        keys: dict[str, set[str]] = {}
        for r in side.used:
            for k, v in _loads(r.get("config")).items():
                keys.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
        for k, vals in sorted(keys.items()):
            if k not in SEED_KEYS and len(vals) > 1:
                out.append(f"{side.label}: runs differ in config.{k} ({', '.join(sorted(vals))})")
    return out


__all__ = ["CompareError", "compare", "judge", "parse_at", "parse_filter"]
