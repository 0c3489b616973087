"""Which runs ``ckptd ls`` shows, and the values of its extra columns.

``--where`` takes a small language, parsed here without ``eval``:
``KEY OP LITERAL`` clauses joined by ``and``. ``KEY`` is ``config.PATH``
(a dotted path into ``init(config=)``), a run field (``name``, ``status``,
``project``, ``attempt``, ``step``, ``id``), or a metric key (its last value on
the effective timeline; ``last.KEY`` when a metric shares a run field's name).
``OP`` is one of ``< <= > >= == = !=``; ``LITERAL`` a number, a quoted
string, ``true``/``false``/``null``, or a bare word (a string). A run that
lacks the key, or whose value is not comparable with the literal, does not
match.
"""

from __future__ import annotations

import fnmatch
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckptd_client.errors import UsageError

from ckptd.store import query

RUN_FIELDS = ("id", "name", "status", "project", "attempt", "step")
OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
    "<": operator.lt, ">": operator.gt, "=": operator.eq,
}
_TOKEN = re.compile(r"""\s*(?:
    (?P<op><=|>=|==|!=|<|>|=)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<word>[^\s<>=!"']+)
)""", re.X)


@dataclass(frozen=True)
class Clause:
    key: str
    op: str
    value: Any

    def matches(self, run: dict[str, Any]) -> bool:
        found, value = lookup(run, self.key)
        if not found:
            return False
        if isinstance(value, bool) != isinstance(self.value, bool) and self.value is not None:
            return False
        try:
            return bool(OPS[self.op](value, self.value))
        except TypeError:
            return False  # a string against a number: not comparable, no match


def _literal(token: str, quoted: bool) -> Any:
    if quoted:
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    low = token.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token)
    except ValueError:
        return token


def parse_where(expr: str) -> list[Clause]:
    """``'config.lr<1e-3 and loss < 0.5'`` -> clauses.

    :raises UsageError: the expression does not parse (the message shows where).
    """
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise UsageError(f"--where: cannot read {expr[pos:]!r}; write KEY OP VALUE "
                             "joined by `and`, e.g. --where 'config.lr<1e-3 and loss<0.5'")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    clauses: list[Clause] = []
    i = 0
    while True:
        part = tokens[i:i + 3]
        if len(part) < 3 or part[0][0] != "word" or part[1][0] != "op" or part[2][0] == "op":
            shown = " ".join(t for _, t in tokens[i:i + 3]) or "(nothing)"
            raise UsageError(f"--where: expected KEY OP VALUE at {shown!r}, e.g. "
                             "--where 'config.lr<1e-3 and loss<0.5'")
        clauses.append(Clause(part[0][1], part[1][1], _literal(part[2][1], part[2][0] == "str")))
        i += 3
        if i == len(tokens):
            return clauses
        if tokens[i] != ("word", tokens[i][1]) or tokens[i][1].lower() != "and":
            raise UsageError(f"--where: expected `and` before {tokens[i][1]!r} (only `and` "
                             "joins clauses)")
        i += 1


def lookup(run: dict[str, Any], key: str) -> tuple[bool, Any]:
    """``(found, value)`` of a ``--where`` / ``--columns`` key in an ``ls --json`` object."""
    if key.startswith("config."):
        node: Any = run.get("config") or {}
        for part in key[len("config."):].split("."):
            if not isinstance(node, dict) or part not in node:
                return False, None
            node = node[part]
        return True, node
    if key in RUN_FIELDS:
        return True, run.get(key)
    last = run.get("last") or {}
    if key.startswith("last.") and key[5:] in last:
        return True, last[key[5:]]
    if key in last:
        return True, last[key]
    return False, None


def needs_last(keys: list[str]) -> bool:
    """Whether any key names a metric (reading last values costs a query per key)."""
    return any(not k.startswith("config.") and k not in RUN_FIELDS for k in keys)


def list_runs(reader: query.Reader, *, status: str | None = None, group: str | None = None,
              project: str | None = None, tags: list[str] | None = None, name: str | None = None,
              where: list[Clause] | None = None, with_last: bool = True) -> list[dict[str, Any]]:
    """The ``ls --json`` objects of the runs that pass every filter, oldest first."""
    sql, args = "SELECT * FROM runs WHERE 1", []
    if status:
        sql += " AND status = ?"
        args.append(status)
    if project is not None:
        sql += " AND project = ?"
        args.append(project)
    if group is not None:
        sql += " AND group_name = ?"
        args.append(group)
    rows = reader.rows(sql + " ORDER BY started, rowid", tuple(args))
    all_tags = reader.tags()
    out = []
    for row in rows:
        run_tags = all_tags.get(row["id"], [])
        if tags and not set(tags) <= set(run_tags):
            continue
        if name is not None and not fnmatch.fnmatchcase(row["name"] or "", name):
            continue
        obj = query.summary(row) | {
            "project": row.get("project"), "tags": run_tags,
            "config": query._loads(row.get("config")) or {}, "note": row.get("note"),
        }
        if with_last:
            obj["last"] = reader.last_values(row["id"])
        if where and not all(c.matches(obj) for c in where):
            continue
        out.append(obj)
    return out


def cell(run: dict[str, Any], key: str) -> Any:
    """A ``--columns`` value as a table shows it (``None`` prints as ``-``)."""
    found, value = lookup(run, key)
    if not found:
        return None
    if isinstance(value, float):
        return str(value) if math.isnan(value) or math.isinf(value) else f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return query.to_json(value)
    return value


__all__ = ["Clause", "cell", "list_runs", "lookup", "needs_last", "parse_where"]
