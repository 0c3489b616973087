"""``ckptd export``: a run's metrics as TensorBoard event files, CSV, Parquet or JSONL.

Rows stream from a read-only SQLite cursor to the writer, so a run of
millions of points exports in constant memory (SQLite sorts on disk). By
default only the effective timeline is written (what a resumed run
continues from; points a later attempt superseded are left out);
``all_attempts`` keeps them, and TensorBoard then gets one sub-run per
attempt, so superseded curves are not drawn as one zigzag line.

Long format (one row per point): ``run, attempt, step, key, value, time``.
Wide format (``wide``): one row per (step, attempt) with one column per key.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckptd_client.errors import CkptdError

from ckptd.exports import need
from ckptd.store import query

FORMATS = ("tensorboard", "csv", "parquet", "jsonl")
LONG_COLUMNS = ("run", "attempt", "step", "key", "value", "time")
WIDE_COLUMNS = ("run", "attempt", "step", "time")
#: Rows per Parquet row group / batch held in memory.
BATCH = 65536
TMP_SUFFIX = ".ckptd-tmp"

Point = tuple[int, int, str, float, float]  # attempt, step, key, value, time


def points(reader: query.Reader, run_id: str, all_attempts: bool) -> Iterator[Point]:
    """The run's own metric points in step order, NaN for a stored NULL, lazily."""
    series = [s for s in reader.series(run_id) if s.src.startswith("c")]
    for step, attempt, _seq, key, value, t, _sup, _rank in reader.points(
            run_id, series, all_attempts):
        yield attempt, step, key, float(value), t


def keys(reader: query.Reader, run_id: str, all_attempts: bool) -> list[str]:
    """The run's own keys with a point (on the effective timeline unless ``all_attempts``):
    one index seek per series."""
    cutoffs = {} if all_attempts else reader.cutoffs(run_id)
    out: set[str] = set()
    for s in reader.series(run_id):
        if not s.src.startswith("c") or s.key in out:
            continue
        bound = cutoffs.get(s.attempt)
        if reader.conn.execute(
                "SELECT 1 FROM metric_points WHERE sid = ?"
                + ("" if bound is None else " AND step <= ?") + " LIMIT 1",
                (s.sid,) if bound is None else (s.sid, bound)).fetchone():
            out.add(s.key)
    return sorted(out)


def wide_rows(run_id: str, pts: Iterator[Point], columns: list[str]) -> Iterator[list[Any]]:
    """One row per (step, attempt): run, attempt, step, time (its last), then each key
    (None where not logged; the last value where logged twice)."""
    index = {k: i for i, k in enumerate(columns)}
    row: list[Any] | None = None
    for attempt, step, key, value, t in pts:
        if row is None or row[1] != attempt or row[2] != step:
            if row is not None:
                yield row
            row = [run_id, attempt, step, t, *([None] * len(columns))]
        row[3] = max(row[3], t)
        row[4 + index[key]] = value
    if row is not None:
        yield row


def export_run(reader: query.Reader, run_id: str, fmt: str, out_dir: Path, *,
               all_attempts: bool = False, wide: bool = False) -> dict[str, Any]:
    """Write one run to ``out_dir``; returns ``{"run", "path", "points"}``.

    Files appear whole or not at all (written as ``*.ckptd-tmp``, renamed).

    :raises CkptdError: unknown format, ``--wide`` with tensorboard/jsonl, or
        a TensorBoard folder for this run that already exists.
    :raises MissingExtra: the format's library is not installed.
    """
    if fmt not in FORMATS:
        raise CkptdError(f"export: --format {fmt!r} is not one of {', '.join(FORMATS)}")
    if wide and fmt not in ("csv", "parquet"):
        raise CkptdError("export: --wide applies to csv and parquet only")
    out_dir.mkdir(parents=True, exist_ok=True)
    pts = points(reader, run_id, all_attempts)
    if fmt == "tensorboard":
        path = out_dir / run_id
        n = _write_tensorboard(pts, path, per_attempt=all_attempts)
        return {"run": run_id, "path": os.fspath(path), "points": n}
    path = out_dir / f"{run_id}.{fmt}"
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        if wide:
            columns = keys(reader, run_id, all_attempts)
            header = [*WIDE_COLUMNS, *columns]
            rows: Iterator[Any] = wide_rows(run_id, pts, columns)
        else:
            header = list(LONG_COLUMNS)
            rows = ((run_id, *p) for p in pts)
        n = {"csv": _write_csv, "parquet": _write_parquet, "jsonl": _write_jsonl}[fmt](
            tmp, header, rows, wide)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return {"run": run_id, "path": os.fspath(path), "points": n}


def _write_csv(path: Path, header: list[str], rows: Iterator[Any], wide: bool) -> int:
    n = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v
                             for v in row])
            n += 1
    return n


def _write_jsonl(path: Path, header: list[str], rows: Iterator[Any], wide: bool) -> int:
    n = 0
    with open(path, "w") as f:
        for row in rows:
            f.write(query.to_json(dict(zip(header, row, strict=True))) + "\n")
            n += 1
    return n


def _write_parquet(path: Path, header: list[str], rows: Iterator[Any], wide: bool) -> int:
    pa = need("pyarrow", "export --format parquet")
    pq = need("pyarrow.parquet", "export --format parquet")
    types = {"run": pa.string(), "attempt": pa.int64(), "step": pa.int64(),
             "key": pa.string(), "value": pa.float64(), "time": pa.float64()}
    schema = pa.schema([(c, types.get(c, pa.float64()) if not wide or c in WIDE_COLUMNS
                         else pa.float64()) for c in header])
    n = 0
    with pq.ParquetWriter(os.fspath(path), schema) as writer:
        batch: list[Any] = []

        def put() -> None:
            cols = list(zip(*batch, strict=True)) if batch else [[] for _ in header]
            writer.write_table(pa.table([pa.array(c, type=schema.field(i).type)
                                         for i, c in enumerate(cols)], schema=schema))

        for row in rows:
            batch.append(row)
            n += 1
            if len(batch) >= BATCH:
                put()
                batch = []
        if batch or n == 0:
            put()
    return n


def _write_tensorboard(pts: Iterator[Point], path: Path, per_attempt: bool) -> int:
    """Event files written by tensorboard's own ``EventFileWriter`` (TensorBoard stores
    scalars as float32: that is what it shows)."""
    writer_mod = need("tensorboard.summary.writer.event_file_writer",
                      "export --format tensorboard")
    pb = need("tensorboard.compat.proto.event_pb2", "export --format tensorboard")
    spb = need("tensorboard.compat.proto.summary_pb2", "export --format tensorboard")
    if path.exists() and any(path.rglob("events.out.tfevents.*")):
        raise CkptdError(f"export: {path} already holds TensorBoard event files; remove it "
                         "or pass another -o (TensorBoard would merge the two)")
    writers: dict[int, Any] = {}
    n = 0
    try:
        for attempt, step, key, value, t in pts:
            slot = attempt if per_attempt else 0
            w = writers.get(slot)
            if w is None:
                d = path / f"attempt-{attempt}" if per_attempt else path
                d.mkdir(parents=True, exist_ok=True)
                w = writers[slot] = writer_mod.EventFileWriter(os.fspath(d))
            summary = spb.Summary(value=[spb.Summary.Value(tag=key, simple_value=value)])
            w.add_event(pb.Event(wall_time=t, step=step, summary=summary))
            n += 1
    finally:
        for w in writers.values():
            w.close()
    if not writers:
        path.mkdir(parents=True, exist_ok=True)
    return n
