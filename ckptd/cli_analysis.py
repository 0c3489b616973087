"""``ckptd compare``, ``ckptd reproduce``, ``ckptd sweep``: the command-line skin of
:mod:`ckptd.analysis`."""

from __future__ import annotations

from typing import Any

import typer
from ckptd_client.errors import CkptdError


def _fmt(v: Any) -> str:
    from .cli import fmt_num

    return fmt_num(float(v)) if isinstance(v, (int, float)) else "-"


def _interval(ci: list[float] | None) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"


def print_comparison(result: dict[str, Any]) -> None:
    from .cli import echo, table
    from .query import printable

    direction = "higher" if result["higher_is_better"] else "lower"
    echo(printable(f"{result['key']} at {result['at']} ({direction} is better; 95% intervals "
                   f"from {result['resamples']} bootstrap resamples, seed {result['seed']})"))
    rows = [{"side": s["side"], "n": str(s["n"]), "mean": _fmt(s["mean"]),
             "std": _fmt(s["std"]), "median": _fmt(s["median"]), "iqm": _fmt(s["iqm"]),
             "min": _fmt(s["min"]), "max": _fmt(s["max"]), "ci95 of mean": _interval(s["ci95"]),
             "ci95 of iqm": _interval(s["iqm_ci95"]), "verdict": s["verdict"]}
            for s in result["sides"]]
    table(rows, list(rows[0]))
    for d in result["differences"]:
        echo(printable(f"{d['a']} - {d['b']}: {_fmt(d['diff'])} {_interval(d['ci95'])}   "
                       f"P({d['a']} better than {d['b']}) = {_fmt(d['p_better'])} "
                       f"{_interval(d['p_better_ci95'])}"))
    for k, by_side in result["config_diff"].items():
        parts = "  ".join(f"{side}: {', '.join(map(str, vals)) or '(unset)'}"
                          for side, vals in by_side.items())
        echo(printable(f"config differs: {k}  {parts}"))
    for w in result["warnings"]:
        echo(printable(f"warning: {w}"))
    for n in result["notes"]:
        echo(printable(f"note: {n}"))
    echo(printable(f"verdict: {result['verdict']}"))


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        sides: list[str] = typer.Argument(..., help="two or more sides: a run (id, prefix or "
                                                    "name), @GROUP, or KEY=VALUE filters "
                                                    "(config.lr=3e-4,group=G)"),
        key: str = typer.Option(..., "--key", help="the metric to compare, e.g. val/acc"),
        at: str = typer.Option("final", "--at", help="final, best or step=N"),
        higher: bool | None = typer.Option(
            None, "--higher-is-better/--lower-is-better",
            help="direction of the metric (default: guessed from its name, and said)"),
        where: str | None = typer.Option(None, "--where",
                                         help="only runs matching KEY=VALUE[,KEY=VALUE]"),
        resamples: int = typer.Option(2000, "--resamples", min=100,
                                      help="bootstrap resamples"),
        seed: int = typer.Option(0, "--seed", help="seed of the bootstrap"),
        as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    ) -> None:
        """Is one side better than another, or is that the seed? Mean, IQM, bootstrap
        intervals, P(A better than B), and a verdict that refuses to guess."""
        from . import cli, query
        from .analysis.compare import compare

        with query.Reader(cli.home()) as reader:
            result = compare(reader, list(sides), key, at=at, higher=higher, where=where,
                             resamples=resamples, seed=seed)
        if as_json:
            cli.emit_json(result)
        else:
            print_comparison(result)


    @app.command("reproduce")
    def reproduce_cmd(
        run: str | None = typer.Argument(None, help="run id, unique prefix or name "
                                                    "(default: the newest run)"),
        as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    ) -> None:
        """Rerun a finished run from its recorded commit, diff, command and environment,
        then compare the curves value by value (exit 1 when they differ)."""
        import sys

        from . import cli
        from .analysis.reproduce import reproduce

        # the rerun's own output goes to stderr: stdout is the report (or the JSON)
        result = reproduce(cli.home(), run, out=sys.stderr)
        if as_json:
            cli.emit_json(result)
        else:
            print_reproduction(result)
        if not result["identical"]:
            raise typer.Exit(1)


def print_reproduction(result: dict[str, Any]) -> None:
    from .cli import echo
    from .query import printable

    echo(printable(f"run {result['run']} rerun as {result['reproduction']} in "
                   f"{result['worktree']}"))
    if result["identical"]:
        echo(f"bit-identical: all {result['values_compared']} values of the effective "
             "curves are equal")
    elif result["first_diff_step"] is None:
        echo(f"differs: exit status {result['exit_code']}, originally "
             f"{result['original_exit_code']}")
    else:
        echo(f"differs: first at step {result['first_diff_step']} "
             f"({result['differing_values']} of {result['values_compared']} values differ)")
        for d in result["first_differences"]:
            echo(printable(f"  step {d['step']} {d['key']}: original {_fmt(d['original'])}"
                           f"  reproduced {_fmt(d['reproduced'])}"))
    final = result["final"]
    for key in sorted(set(final["original"]) | set(final["reproduced"])):
        echo(printable(f"  final {key}: {_fmt(final['original'].get(key))} -> "
                       f"{_fmt(final['reproduced'].get(key))}"))
    if result["provenance_differences"]:
        echo("provenance differences (what could explain a difference):")
        for k, (a, b) in result["provenance_differences"].items():
            echo(printable(f"  {k}: {a} -> {b}"))
    else:
        echo("provenance: no recorded difference")


__all__ = ["register", "CkptdError"]
