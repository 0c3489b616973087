"""``ckptd compare``, ``ckptd reproduce``, ``ckptd sweep``: the command-line skin of
:mod:`ckptd.analysis`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from ckptd_client.errors import CkptdError


def _fmt(v: Any) -> str:
    from ckptd.cli import fmt_num

    return fmt_num(float(v)) if isinstance(v, (int, float)) else "-"


def _interval(ci: list[float] | None) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"


def print_comparison(result: dict[str, Any]) -> None:
    from ckptd.cli import echo, table
    from ckptd.store.query import printable

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
    if result.get("plot"):
        echo(printable(f"plot: {result['plot']}"))


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
        plot: Path | None = typer.Option(
            None, "--plot", help="also draw FILE (.png/.svg): per-seed curves, each side's "
                                 "mean and 95% bootstrap band"),
    ) -> None:
        """Is one side better than another, or is that the seed? Mean, IQM, bootstrap
        intervals, P(A better than B), and a verdict that refuses to guess."""
        from ckptd import cli
        from ckptd.analysis.compare import compare
        from ckptd.store import query

        with query.Reader(cli.home()) as reader:
            result = compare(reader, list(sides), key, at=at, higher=higher, where=where,
                             resamples=resamples, seed=seed)
            if plot is not None:
                from ckptd.analysis import compare_plot

                compare_plot.render(reader, result, plot)
                result["plot"] = str(plot)
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

        from ckptd import cli
        from ckptd.analysis.reproduce import reproduce

        # the rerun's own output goes to stderr: stdout is the report (or the JSON)
        result = reproduce(cli.home(), run, out=sys.stderr)
        if as_json:
            cli.emit_json(result)
        else:
            print_reproduction(result)
        if not result["identical"]:
            raise typer.Exit(1)


    @app.command("sweep", context_settings={"allow_interspersed_args": False,
                                            "ignore_unknown_options": True})
    def sweep_cmd(
        command: list[str] = typer.Argument(None, help="the command after --, with {NAME} "
                                                       "and {seed} placeholders; or "
                                                       "`status NAME`"),
        name: str | None = typer.Option(None, "--name", help="the sweep's name (also the "
                                                             "group of its runs)"),
        seeds: str | None = typer.Option(None, "--seeds", help="seeds: 0-4 or 1,5,9"),
        grid: list[str] = typer.Option(None, "--grid", help="NAME=V1,V2 (repeatable)"),
        parallel: int | None = typer.Option(None, "--parallel", min=1,
                                            help="at most this many runs at once (default: "
                                                 "one per GPU slice, else 1)"),
        gpus: str | None = typer.Option(None, "--gpus", help="GPU ids to share out, e.g. "
                                                             "0,1,2,3"),
        gpus_per_run: int | None = typer.Option(None, "--gpus-per-run", min=1,
                                                help="GPUs in each run's CUDA_VISIBLE_DEVICES"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the commands, run none"),
        detach: bool = typer.Option(False, "--detach",
                                    help="return at once; the daemon runs the sweep"),
        as_json: bool = typer.Option(False, "--json", help="machine-readable output "
                                                           "(with status, --dry-run)"),
    ) -> None:
        """Run one command over a grid of settings and seeds, each combination a
        supervised run in group NAME; `ckptd sweep status NAME` shows where it is."""
        from ckptd import cli

        args = list(command or [])
        if name is None and args[:1] == ["status"]:
            rest = [a for a in args[1:] if a != "--json"]
            if len(rest) != 1:
                raise CkptdError("sweep status: give one sweep name")
            raise typer.Exit(_sweep_status(cli.home(), rest[0], as_json or "--json" in args))
        raise typer.Exit(_sweep_start(cli.home(), args, name, seeds, list(grid or []),
                                      parallel, gpus, gpus_per_run, dry_run, detach, as_json))


def _sweep_status(home: Any, name: str, as_json: bool, quiet: bool = False) -> int:
    from ckptd import cli
    from ckptd.analysis.sweep import status
    from ckptd.store import query

    with query.Reader(home) as reader:
        st = status(reader, name)
    if as_json:
        cli.emit_json(st)
    elif not quiet:
        counts = "  ".join(f"{k} {v}" for k, v in sorted(st["counts"].items()))
        cli.echo(query.printable(f"sweep {name}: {st['total']} runs, parallel "
                                 f"{st['parallel']}: {counts}"))
        rows = [{"idx": str(i["idx"]), "params": " ".join(f"{k}={v}" for k, v in
                                                          i["params"].items()),
                 "run": i["run_id"], "status": i["status"], "attempt": i["attempt"],
                 "step": i["step"], "gpus": i["gpus"]} for i in st["items"]]
        cli.table(rows, ["idx", "params", "run", "status", "attempt", "step", "gpus"])
    if not st["done"]:
        return 0
    return 0 if st["counts"].get("finished", 0) == st["total"] else 1


def _sweep_start(home: Any, command: list[str], name: str | None, seeds: str | None,
                 grid: list[str], parallel: int | None, gpus: str | None,
                 gpus_per_run: int | None, dry_run: bool, detach: bool, as_json: bool) -> int:
    import os
    import shlex
    import time

    from ckptd_client import transport

    from ckptd import cli
    from ckptd.analysis import sweep
    from ckptd.store import query

    if not name:
        raise CkptdError("sweep: give it a --name (it is also the group of its runs)")
    if not sweep.NAME_RE.match(name):
        raise CkptdError(f"sweep: --name {name!r}: use letters, digits, '.', '_' or '-'")
    if not command:
        raise CkptdError("sweep: give the command after --, e.g. `ckptd sweep --name s "
                         "--seeds 0-2 -- python train.py --seed {seed}`")
    seed_list = sweep.parse_seeds(seeds)
    grid_map = sweep.parse_grid(grid)
    items = sweep.expand(command, grid_map, seed_list)
    slices = sweep.gpu_slices(gpus, gpus_per_run)
    parallel = parallel or max(len(slices), 1)
    if slices and parallel > len(slices):
        raise CkptdError(f"sweep: --parallel {parallel} but only {len(slices)} GPU slice(s)")
    if dry_run:
        if as_json:
            cli.emit_json([{"idx": i, **it} for i, it in enumerate(items)])
        for i, it in enumerate(items):
            if not as_json:
                cli.echo(query.printable(f"{i:>3}  {shlex.join(it['command'])}"))
        return 0
    env = {k: v for k, v in os.environ.items()
           if k not in ("CKPTD_RUN_ID", "CKPTD_ATTEMPT", "CKPTD_AUTOSTARTED")}
    spec = {"seeds": seed_list, "grid": grid_map, "gpu_slices": slices}
    reply = transport.call(home, "sweep_create", {
        "name": name, "items": items, "parallel": parallel, "env": env, "cwd": os.getcwd(),
        "spec": spec, "template": command})
    verb = "created" if reply["created"] else "resumed (same spec)"
    print(f"ckptd: sweep {name} {verb}: {len(items)} runs, {parallel} at a time; the daemon "
          f"runs it (`ckptd sweep status {name}`, `ckptd ls --group {name}`)",
          file=sys.stderr, flush=True)
    if detach:
        return 0
    last = None
    try:
        while True:
            with query.Reader(home) as reader:
                st = sweep.status(reader, name)
            counts = "  ".join(f"{k} {v}" for k, v in sorted(st["counts"].items()))
            if counts != last:
                print(f"ckptd: sweep {name}: {counts}", file=sys.stderr, flush=True)
                last = counts
            if st["done"]:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        print(f"ckptd: sweep {name} goes on in the daemon", file=sys.stderr)
        return 130
    return _sweep_status(home, name, as_json)


def print_reproduction(result: dict[str, Any]) -> None:
    from ckptd.cli import echo
    from ckptd.store.query import printable

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
