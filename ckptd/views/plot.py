"""``ckptd plot``: curves as a PNG, SVG or HTML file (matplotlib, Agg), or in
the terminal (plotille braille) when no file is asked for."""

from __future__ import annotations

import datetime as dt
import html
import io
import math
import os
from pathlib import Path
from typing import Any

from ckptd_client.errors import CkptdError

from ckptd.store.query import Reader, UnknownKey, printable
from ckptd.views import braille, series

FORMATS = (".png", ".svg", ".html")


def load(reader: Reader, refs: list[str], keys: list[str], buckets: int
         ) -> list[dict[str, Any]]:
    """Per (run, key): the bucketed curve, resume markers and checkpoint dots."""
    out = []
    for ref in refs or [None]:  # type: ignore[list-item]
        run = reader.resolve(ref)
        known = series.keys(reader, run["id"])
        for key in keys:
            if key not in known:
                raise UnknownKey(f"run {run['id']} has no metric {key!r}; its keys: "
                                 + (", ".join(map(repr, known)) or "none yet"))
            out.append({"run": run, "key": key,
                        "series": series.downsample(reader, run["id"], key, buckets),
                        "markers": series.markers(reader, run["id"]),
                        "dots": series.checkpoint_dots(reader, run["id"], key)})
    return out


def _label(run: dict[str, Any]) -> str:
    name = run.get("name") or run["id"]
    return name if name == run["id"] else f"{name} ({run['id']})"


def render_file(curves: list[dict[str, Any]], keys: list[str], out: Path, *, smooth: float,
                x: str, width: int, height: int, log_y: bool) -> None:
    """Write ``out``; its suffix picks the format. One ``<g id="run-...">``
    holds each run's line in an SVG, so a script can find a run's path."""
    if out.suffix.lower() not in FORMATS:
        raise CkptdError(f"-o {out}: unknown picture format; use .png, .svg or .html")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, axes = plt.subplots(len(keys), 1, figsize=(width / dpi, height / dpi), dpi=dpi,
                             squeeze=False, sharex=True)
    for i, key in enumerate(keys):
        ax = axes[i][0]
        for j, c in enumerate(cv for cv in curves if cv["key"] == key):
            s: series.Series = c["series"]
            color = f"C{j % 10}"
            xs, ys = _xy(s, smooth, x)
            (line,) = ax.plot(xs, ys, color=color, linewidth=1.2, label=_label(c["run"]))
            line.set_gid(f"run-{c['run']['id']}-{key}")
            steps = s.step
            for m in c["markers"]:
                if m.step < 0 or not steps:
                    continue
                ax.axvline(_x_at(s, m.step, x), color=color, linestyle="--", linewidth=0.8,
                           alpha=0.7, gid=f"resume-{c['run']['id']}-{m.attempt}")
            dots = [(sx, v) for sx, v in c["dots"] if not math.isnan(v)]
            if dots and steps:
                ax.scatter([_x_at(s, sx, x) for sx, _ in dots], [v for _, v in dots],
                           s=14, color=color, edgecolors="black", linewidths=0.5, zorder=3,
                           gid=f"ckpt-{c['run']['id']}-{key}")
        ax.set_ylabel(printable(key))
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(curves) > len(keys):
            ax.legend(fontsize=8)
    axes[-1][0].set_xlabel("time" if x == "time" else "step")
    fig.tight_layout()
    if out.suffix.lower() == ".html":
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        title = html.escape(", ".join(keys))
        text = (f"<!doctype html><meta charset=utf-8><title>ckptd plot: {title}</title>"
                f"<body style='margin:0'>{buf.getvalue()}</body>")
        write_picture(out, text.encode())
    else:
        buf2 = io.BytesIO()
        fig.savefig(buf2, format=out.suffix.lower()[1:], dpi=dpi)
        write_picture(out, buf2.getvalue())
    plt.close(fig)


def write_picture(out: Path, data: bytes) -> None:
    """Whole or not at all: a picture a browser is reloading is never half-written."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CkptdError(f"cannot write {out}: {exc.strerror}") from None


def _xy(s: series.Series, smooth: float, x: str) -> tuple[list[Any], list[float]]:
    if smooth > 0:
        ys = series.smooth(s.vlast, smooth)
        xs: list[Any] = list(s.step)
    else:
        xs, ys = s.polyline()
    if x == "time":
        xs = [_x_at(s, v, x) for v in xs]
    return xs, ys


def _x_at(s: series.Series, step: float, x: str) -> Any:
    """The x of ``step``: itself, or (``--x time``) the wall clock of the nearest bucket."""
    if x != "time":
        return step
    import bisect

    i = min(bisect.bisect_left(s.step, step), len(s.step) - 1)
    return dt.datetime.fromtimestamp(s.time[i])


def render_terminal(curves: list[dict[str, Any]], keys: list[str], *, smooth: float,
                    width: int, height: int, color: bool, log_y: bool) -> str:
    """The same picture in braille characters, for a terminal over SSH."""
    parts = []
    for key in keys:
        fig = braille.figure(max(20, width), max(5, height), color=color)
        fig.x_label, fig.y_label = "step", printable(key)
        colors = ["cyan", "yellow", "green", "magenta", "red", "blue"]
        steps = [v for cv in curves if cv["key"] == key for v in cv["series"].step]
        if steps:
            fig.set_x_limits(min_=min(steps), max_=max(max(steps), min(steps) + 1))
        for j, c in enumerate(cv for cv in curves if cv["key"] == key):
            s = c["series"]
            xs, ys = _xy(s, smooth, "step")
            if log_y:
                ys = [math.log10(v) if v > 0 else float("nan") for v in ys]
            pts = [(a, b) for a, b in zip(xs, ys, strict=True) if math.isfinite(b)]
            if pts:
                fig.plot([p[0] for p in pts], [p[1] for p in pts], lc=colors[j % 6],
                         label=printable(_label(c["run"])))
        parts.append(printable(key) + (" (log10)" if log_y else ""))
        parts.append(fig.show(legend=len(curves) > len(keys)))
    return "\n".join(parts)
