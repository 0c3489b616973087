"""``ckptd export RUN... --format F -o DIR``: the skin of :mod:`ckptd.exports.metrics`."""

from __future__ import annotations

from pathlib import Path

import typer

from ckptd.store import query


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        runs: list[str] = typer.Argument(..., help="run ids, prefixes or names"),
        fmt: str = typer.Option(..., "--format", help="tensorboard, csv, parquet or jsonl"),
        output: Path = typer.Option(..., "-o", "--output", help="directory to write into"),
        all_attempts: bool = typer.Option(False, "--all-attempts",
                                          help="include values superseded by a resume"),
        wide: bool = typer.Option(False, "--wide",
                                  help="csv/parquet: one row per step, one column per key"),
    ) -> None:
        """Export runs' metrics (effective timeline unless --all-attempts), one file or
        TensorBoard folder per run; long format: run, attempt, step, key, value, time."""
        from ckptd import cli
        from ckptd.exports.metrics import export_run

        with query.Reader(cli.home()) as reader:
            ids = list(dict.fromkeys(reader.resolve(r)["id"] for r in runs))
            for run_id in ids:
                result = export_run(reader, run_id, fmt, output, all_attempts=all_attempts,
                                    wide=wide)
                cli.echo(f"exported {run_id}: {result['points']} rows to {result['path']}")
