"""``ckptd watch``: a full-screen live dashboard (Textual; charts in braille by plotille).

Panes: runs (status, attempt, step, steps/s, ETA, last values), charts (with
``|`` resume markers and ``o`` checkpoint dots), system, checkpoints, and the
console/events of the selected run, following like ``tail -f``.

It redraws at most four times a second and only when the store changed:
each tick asks SQLite for ``PRAGMA data_version`` (a counter in the shared
WAL index: no disk read), so an idle dashboard costs next to nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, RichLog, Static

from ckptd.store.query import Cursor, Reader, printable
from ckptd.views import braille, series

TICK_S = 0.25
#: Checkpoint dots drawn per curve (more would hide the line in a terminal).
MAX_DOTS = 16
SMOOTHING = (0.0, 0.6, 0.9, 0.99)
ZOOMS = (0, 100, 1_000, 10_000, 100_000)  # last N steps; 0: everything
COLORS = ("cyan", "yellow", "green", "magenta", "red", "blue")

HELP = """ckptd watch: keys

  up/down, j/k   select a run            space   add/remove it from the comparison
  tab            next pane               /       filter runs (enter keeps, esc clears)
  n / p          next / previous key     a       all keys / one key
  l              log-y on/off            s       smoothing 0 / 0.6 / 0.9 / 0.99
  z              zoom: all, last 100 / 1k / 10k / 100k steps
  ?              this help               q       quit

Chart: | where a resumed attempt took over, o a committed checkpoint.
Press any key to close."""


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def fmt_eta(s: float | None) -> str:
    if s is None:
        return "-"
    h, m = divmod(int(s) // 60, 60)
    return f"{h}h{m:02d}" if h else f"{m}m{int(s) % 60:02d}"


class Help(ModalScreen[None]):
    DEFAULT_CSS = "Help { align: center middle; } #help { width: auto; border: round $accent;" \
        " padding: 0 1; background: $surface; }"

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")

    def on_key(self) -> None:
        self.dismiss()


class Chart(Static):
    """The curves of the selected key(s); drawn for the size it has at each render.

    The curves are read from the store by the render itself, bucketed for the
    plot's width in braille dots: before the first layout there is no width,
    and reading them then and again once laid out cost ``watch``'s first
    frame a second query and a second paint.
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.curves: list[dict[str, Any]] = []
        self.log_y = False
        self.smooth = 0.0
        self.color = not os.environ.get("NO_COLOR")
        self.wanted: tuple[Any, Callable[[int], list[dict[str, Any]]]] | None = None
        self.loaded: tuple[Any, int] | None = None

    def want(self, what: Any, load: Callable[[int], list[dict[str, Any]]]) -> None:
        """Draw ``load(buckets)``; ``what`` names it: the same ``what`` at the
        same width is not read again (a tick with no commit, a resize)."""
        self.wanted = (what, load)
        self.refresh()

    def plot_width(self) -> int:
        return max(10, self.size.width - 14)

    def render(self) -> Text:
        w, h = self.size.width, self.size.height
        if self.wanted is not None and (self.wanted[0], w) != self.loaded:
            self.curves = self.wanted[1](2 * self.plot_width())  # braille: 2 dots a char
            self.loaded = (self.wanted[0], w)
        if not self.curves:
            return Text("no metrics yet: this pane fills as the run logs")
        keys = list(dict.fromkeys(c["key"] for c in self.curves))
        per = max(4, h // len(keys))
        keys = keys[:max(1, h // per)]
        out = Text()
        for key in keys:
            fig = braille.figure(self.plot_width(), max(2, per - 4), color=self.color)
            fig.x_label, fig.y_label = "step", ""
            curves = [c for c in self.curves if c["key"] == key]
            xs_all = [x for c in curves for x in c["series"].step]
            if not xs_all:
                continue
            x0, x1 = min(xs_all), max(max(xs_all), min(xs_all) + 1)
            fig.set_x_limits(min_=x0, max_=x1)
            for i, c in enumerate(curves):
                s: series.Series = c["series"]
                xs, ys = (s.step, series.smooth(s.vlast, self.smooth)) if self.smooth \
                    else s.polyline()
                if self.log_y:
                    ys = [math.log10(v) if v > 0 else float("nan") for v in ys]
                pts = [(a, b) for a, b in zip(xs, ys, strict=True) if math.isfinite(b)]
                if not pts:
                    continue
                color = COLORS[i % len(COLORS)]
                fig.plot([p[0] for p in pts], [p[1] for p in pts], lc=color)
                for m in c["markers"]:
                    if x0 <= m.step <= x1:
                        fig.axvline((m.step - x0) / (x1 - x0), lc="red")
                dots = [(a, math.log10(b) if self.log_y and b > 0 else b)
                        for a, b in c["dots"] if x0 <= a <= x1 and math.isfinite(b)]
                if dots:
                    fig.scatter([d[0] for d in dots], [d[1] for d in dots], lc=color,
                                marker="o")
            title = printable(key) + ("  (log10)" if self.log_y else "") + \
                (f"  smooth {self.smooth}" if self.smooth else "")
            out.append(title + "\n", style="bold")
            out.append(Text.from_ansi(fig.show()))
            out.append("\n")
        return out


class Watch(App[int]):
    TITLE = "ckptd watch"
    CSS = """
    Screen { layout: vertical; }
    #top { height: 1fr; }
    #bottom { height: 9; }
    #runs { width: 42%; height: 1fr; border: round $primary; }
    #chart { width: 1fr; height: 1fr; border: round $primary; }
    #sys { width: 26; border: round $secondary; }
    #ckpts { width: 20; border: round $secondary; }
    #console { width: 1fr; border: round $secondary; }
    #filter { display: none; dock: top; }
    #filter.shown { display: block; }
    """
    BINDINGS = [
        Binding("q", "quit_watch", "quit"), Binding("question_mark", "help", "help"),
        Binding("slash", "filter", "filter"), Binding("l", "log_y", "log-y"),
        Binding("s", "smooth", "smooth"), Binding("z", "zoom", "zoom"),
        Binding("n", "key(1)", "next key"), Binding("p", "key(-1)", "prev key", show=False),
        Binding("a", "all_keys", "all keys"), Binding("space", "compare", "compare"),
        Binding("j", "move(1)", "down", show=False), Binding("k", "move(-1)", "up", show=False),
    ]

    def __init__(self, home: Path, runs: list[str], keys: list[str]) -> None:
        super().__init__()
        self.home = home
        self.reader = Reader(home)
        self.only = [self.reader.resolve(r)["id"] for r in runs]
        self.want_keys = keys
        self.rows: list[dict[str, Any]] = []
        self.selected: str | None = self.only[0] if self.only else None
        self.compare: set[str] = set()
        self.current_key: str | None = None  # kept by name: a new key must not move it
        self.all_keys = False
        self.zoom = 0
        self.version: int | None = None
        self.cursor = Cursor()
        self.console_run: str | None = None
        self.filter = ""

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter runs by name, id, status or tag", id="filter")
        with Vertical():
            with Horizontal(id="top"):
                yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
                yield Chart(id="chart")
            with Horizontal(id="bottom"):
                yield Static(id="sys")
                yield Static(id="ckpts")
                yield RichLog(id="console", max_lines=2000, wrap=False, markup=False)
        yield Footer()

    def on_mount(self) -> None:
        for wid, title in (("runs", "runs"), ("sys", "system"), ("ckpts", "checkpoints"),
                           ("console", "console / events")):
            self.query_one(f"#{wid}").border_title = title
        table = self.query_one(DataTable)
        table.add_columns(" ", "name", "status", "att", "step", "step/s", "ETA", "last")
        self.refresh_data(force=True)
        table.focus()
        self.set_interval(TICK_S, self.refresh_data)

    # ------------------------------------------------------------ data

    def refresh_data(self, force: bool = False) -> None:
        version = self.reader.conn.execute("PRAGMA data_version").fetchone()[0]
        if not force and version == self.version:
            return
        self.version = version
        rows = series.run_rows(self.reader, self.only or None)
        self.rows = rows
        if self.selected is None and rows:
            self.selected = rows[0]["id"]
        self.draw_runs()
        self.draw_run()

    def visible_rows(self) -> list[dict[str, Any]]:
        f = self.filter.lower()
        return [r for r in self.rows if not f or f in " ".join(
            map(str, (r["name"], r["id"], r["status"], *r["tags"]))).lower()]

    def draw_runs(self) -> None:
        table = self.query_one(DataTable)
        rows = self.visible_rows()
        table.clear()
        for r in rows:
            last = "  ".join(f"{printable(k)}={fmt(v)}" for k, v in list(r["last"].items())[:3])
            table.add_row("*" if r["id"] in self.compare else " ", printable(r["name"]),
                          r["status"], str(r["attempt"]), fmt(r["step"]),
                          fmt(r["rate"]), fmt_eta(r["eta_s"]), last, key=r["id"])
        ids = [r["id"] for r in rows]
        if self.selected in ids:
            table.move_cursor(row=ids.index(self.selected), animate=False)

    def keys_of(self, run: dict[str, Any]) -> list[str]:
        user = [k for k in run["keys"] if not k.startswith("sys/")]
        ordered = [k for k in self.want_keys if k in run["keys"]] + \
            [k for k in user if k not in self.want_keys]
        return ordered

    def draw_run(self) -> None:
        """The chart of the selected run, then (after it is on the screen) the side panes."""
        run = next((r for r in self.rows if r["id"] == self.selected), None)
        chart = self.query_one(Chart)
        if run is None:
            chart.want(None, lambda _: [])
            return
        keys = self.keys_of(run)
        if keys and self.current_key not in keys:  # first look, or a run without it
            self.current_key = "loss" if "loss" in keys and not self.want_keys else keys[0]
        shown = keys[:4] if self.all_keys else [self.current_key] if keys else []
        runs = [run["id"], *sorted(self.compare - {run["id"]})]
        chart.want((self.version, tuple(runs), tuple(shown), self.zoom),
                   lambda width: self.curves(runs, shown, width))
        zoom = f"  last {ZOOMS[self.zoom]:,} steps" if ZOOMS[self.zoom] else ""
        cmp = f"  vs {len(runs) - 1} run(s)" if len(runs) > 1 else ""
        chart.border_title = escape(printable(f"{run['name']}: " + "  ".join(
            f"[{k}]" if k in shown else k for k in keys[:8]) + zoom + cmp))
        self.call_after_refresh(self.draw_side, run)

    def curves(self, runs: list[str], shown: list[str], width: int) -> list[dict[str, Any]]:
        curves = []
        for key in shown:
            for rid in runs:
                rng = series.step_range(self.reader, rid, key)
                if rng is None:
                    continue
                lo = max(rng[0], rng[1] - ZOOMS[self.zoom]) if ZOOMS[self.zoom] else None
                # the value under a checkpoint is looked up for the few drawn only
                steps = series.checkpoint_steps(self.reader, rid, lo, rng[1], MAX_DOTS)
                curves.append({"key": key, "run": rid,
                               "series": series.downsample(self.reader, rid, key, width, lo),
                               "markers": series.markers(self.reader, rid),
                               "dots": series.checkpoint_dots(self.reader, rid, key, steps)})
        return curves

    def draw_side(self, run: dict[str, Any]) -> None:
        sys_keys = [k for k in run["keys"] if k.startswith("sys/")]
        vals = series.last_values(self.reader, run["id"], sys_keys)
        lines = []
        for k, v in vals.items():
            name = k[4:]
            if name.endswith("_bytes"):
                lines.append(f"{name[:-6]:<11} {v / 2**20:8.1f}M")
            else:
                lines.append(f"{name:<11} {fmt(v):>9}")
        self.query_one("#sys", Static).update("\n".join(lines) or "no samples yet")
        dots = series.checkpoint_dots(self.reader, run["id"])
        self.query_one("#ckpts", Static).update(
            "\n".join(f"step {s}" for s, _ in dots[-7:]) or "none yet")
        log = self.query_one(RichLog)
        if self.console_run != run["id"]:
            log.clear()
            self.console_run, self.cursor = run["id"], Cursor()
        lines_, self.cursor = self.reader.lines(run["id"], with_metrics=False,
                                                all_attempts=False, after=self.cursor)
        for ln in lines_[-200:]:
            prefix = "| " if ln.kind == "console" else f"{ln.level.upper()} "
            log.write(printable(prefix + ln.message))

    # --------------------------------------------------------- actions

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        rid = event.row_key.value if event.row_key is not None else None
        if rid and rid != self.selected:
            self.selected = rid
            self.draw_run()

    def action_quit_watch(self) -> None:
        self.exit(0)

    def action_help(self) -> None:
        self.push_screen(Help())

    def action_move(self, delta: int) -> None:
        table = self.query_one(DataTable)
        table.move_cursor(row=max(0, table.cursor_row + delta))

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter = event.value
        self.draw_runs()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(DataTable).focus()

    def on_key(self, event: Any) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_focus:
            box.value = ""
            box.remove_class("shown")
            self.query_one(DataTable).focus()

    def action_log_y(self) -> None:
        chart = self.query_one(Chart)
        chart.log_y = not chart.log_y
        chart.refresh()

    def action_smooth(self) -> None:
        chart = self.query_one(Chart)
        chart.smooth = SMOOTHING[(SMOOTHING.index(chart.smooth) + 1) % len(SMOOTHING)]
        chart.refresh()

    def action_zoom(self) -> None:
        self.zoom = (self.zoom + 1) % len(ZOOMS)
        self.draw_run()

    def action_key(self, delta: int) -> None:
        run = next((r for r in self.rows if r["id"] == self.selected), None)
        keys = self.keys_of(run) if run else []
        if keys:
            i = keys.index(self.current_key) if self.current_key in keys else 0
            self.current_key = keys[(i + delta) % len(keys)]
        self.draw_run()

    def action_all_keys(self) -> None:
        self.all_keys = not self.all_keys
        self.draw_run()

    def action_compare(self) -> None:
        if self.selected:
            self.compare ^= {self.selected}
            self.draw_runs()
            self.draw_run()

    def on_resize(self) -> None:
        self.draw_run()

    def on_unmount(self) -> None:
        self.reader.close()


def run_watch(home: Path, runs: list[str], keys: list[str]) -> int:
    return Watch(home, runs, keys).run() or 0
