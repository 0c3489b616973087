"""``ckptd watch``, ``ckptd plot`` and ``ckptd ui``: the command-line skin of
:mod:`ckptd.views`. Each view's library (Textual, matplotlib, Starlette) is
imported inside its command only."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import typer
from ckptd_client.errors import CkptdError


class NoTerminal(CkptdError):
    """``watch`` was started without a terminal (a pipe, cron, CI)."""


def register(app: typer.Typer) -> None:
    @app.command()
    def watch(
        runs: list[str] = typer.Argument(None, help="runs to watch (default: all)"),
        key: list[str] = typer.Option([], "--key", help="metric keys to chart first"),
    ) -> None:
        """Full-screen live dashboard: runs, charts, system, console, checkpoints."""
        from ckptd import cli

        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise NoTerminal("watch needs a terminal; without one use `ckptd tail -f RUN` "
                             "or `ckptd metrics RUN`")
        from ckptd.store.query import Reader
        from ckptd.views.watch import run_watch

        Reader(cli.home()).close()  # no store yet: the usual one-line error, not a blank UI
        raise typer.Exit(run_watch(cli.home(), runs or [], key))

    @app.command()
    def plot(
        runs: list[str] = typer.Argument(None, help="runs to plot (default: the newest)"),
        key: list[str] = typer.Option(..., "--key", help="metric key (repeatable)"),
        out: Path | None = typer.Option(None, "-o", "--output",
                                        help="FILE.png, .svg or .html (default: the terminal)"),
        smooth: float = typer.Option(0.0, "--smooth", min=0.0, max=0.999,
                                     help="exponential smoothing weight, 0 (off) to 0.999"),
        x: str = typer.Option("step", "--x", help="x axis: step or time"),
        log_y: bool = typer.Option(False, "--log-y", help="logarithmic y axis"),
        size: str = typer.Option("1000x600", "--size", help="picture size WxH in pixels"),
    ) -> None:
        """Draw metric curves with resume markers and checkpoint dots."""
        from ckptd import cli
        from ckptd.store.query import Reader
        from ckptd.views import plot as plot_mod

        if x not in ("step", "time"):
            raise CkptdError(f"--x {x!r}: use step or time")
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise CkptdError(f"--size {size!r}: give WxH in pixels, e.g. 1000x600") from None
        if not (50 <= width <= 10000 and 50 <= height <= 10000):
            raise CkptdError(f"--size {size!r}: each side must be 50 to 10000 pixels")
        if out is not None and out.suffix.lower() not in plot_mod.FORMATS:
            raise CkptdError(f"-o {out}: unknown picture format; use .png, .svg or .html")
        cols = shutil.get_terminal_size((100, 30)).columns
        with Reader(cli.home()) as reader:
            curves = plot_mod.load(reader, runs or [], key, width if out else cols * 2)
        if out is None:
            cli.echo(plot_mod.render_terminal(
                curves, key, smooth=smooth, width=cols - 20, height=max(8, 20 // len(key)),
                color=cli.color_enabled(), log_y=log_y))
            return
        plot_mod.render_file(curves, key, out, smooth=smooth, x=x, width=width,
                             height=height, log_y=log_y)
        cli.echo(f"wrote {out}")

    @app.command()
    def ui(
        host: str = typer.Option("127.0.0.1", "--host",
                                 help="address to listen on (default: this machine only)"),
        port: int = typer.Option(8765, "--port", min=0, max=65535,
                                 help="port (0: any free one)"),
    ) -> None:
        """Local web page of the runs (read-only, token-protected, live)."""
        from ckptd import cli
        from ckptd.store.query import Reader
        from ckptd.views.ui import serve

        Reader(cli.home()).close()
        serve(cli.home(), host, port, out=cli.echo,
              token=os.environ.get("CKPTD_UI_TOKEN") or None)
