"""``ckptd rm | rename | tag | note | keys``: the command-line skin of
:mod:`ckptd.manage` (writes, through the daemon) and :mod:`ckptd.query` (reads).

Names are resolved to run ids here, read-only; a name that several runs
share is an error listing them (:class:`ckptd.query.AmbiguousRun`), never
a guess, so ``rm`` cannot remove the wrong run.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from ckptd_client import transport
from ckptd_client.errors import UsageError

from ckptd.store import query


def _resolve(refs: list[str]) -> list[dict[str, Any]]:
    from ckptd import cli

    with query.Reader(cli.home()) as reader:
        found = [reader.resolve(ref) for ref in refs]
    unique = {r["id"]: r for r in found}  # `rm a a` removes a once
    return list(unique.values())


def _confirm(runs: list[dict[str, Any]]) -> bool:
    """Ask on a terminal; refuse (a usage error) when nobody can answer."""
    if not sys.stdin.isatty():
        raise UsageError("rm: stdin is not a terminal, so nobody can confirm; pass --yes to "
                         "remove without asking")
    listed = ", ".join(f"{query.printable(r['name'])} ({r['id']})" for r in runs)
    sys.stderr.write(f"remove {len(runs)} run(s): {listed}, with their checkpoints and "
                     "logs? [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def register(app: typer.Typer) -> None:
    @app.command("rm")
    def rm_cmd(runs: list[str] = typer.Argument(..., help="run ids, unique prefixes or names"),
               yes: bool = typer.Option(False, "--yes", "-y",
                                        help="do not ask (required without a terminal)"),
               ) -> None:
        """Remove runs: their rows, checkpoints and files (refuses a running run)."""
        from ckptd import cli

        found = _resolve(runs)
        if not yes and not _confirm(found):
            cli.echo("nothing removed")
            raise typer.Exit(1)
        for run in found:
            done = transport.call(cli.home(), "run_rm", {"run": run["id"]})
            cli.echo(query.printable(f"removed {done['id']} ({done['name']})"))

    @app.command("rename")
    def rename_cmd(run: str = typer.Argument(..., help="run id, unique prefix or name"),
                   new: str = typer.Argument(..., help="the new name")) -> None:
        """Give a run a new name (names may repeat; ids never change)."""
        from ckptd import cli

        (info,) = _resolve([run])
        done = transport.call(cli.home(), "run_rename", {"run": info["id"], "name": new})
        cli.echo(query.printable(f"renamed {done['id']}: {info['name']} -> {done['name']}"))

    @app.command("tag")
    def tag_cmd(run: str = typer.Argument(..., help="run id, unique prefix or name"),
                tags: list[str] = typer.Argument(..., help="one or more tags"),
                untag: bool = typer.Option(False, "--untag", help="remove these tags")) -> None:
        """Add tags to a run (with --untag, remove them); `ls --tag T` filters by them."""
        from ckptd import cli

        (info,) = _resolve([run])
        done = transport.call(cli.home(), "run_tag", {"run": info["id"], "tags": list(tags),
                                                      "untag": untag})
        cli.echo(query.printable(f"{done['id']} tags: {' '.join(done['tags']) or '-'}"))

    @app.command("note")
    def note_cmd(run: str = typer.Argument(..., help="run id, unique prefix or name"),
                 text: str = typer.Argument(..., help='the note ("" clears it)')) -> None:
        """Attach a note to a run (shown by `ckptd show`); replaces the previous one."""
        from ckptd import cli

        (info,) = _resolve([run])
        transport.call(cli.home(), "run_note", {"run": info["id"], "text": text})
        cli.echo(f"{info['id']} note {'set' if text else 'cleared'}")

    @app.command("keys")
    def keys_cmd(run: str | None = typer.Argument(None, help="run id, prefix or name "
                                                  "(default: newest run)"),
                 as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
                 ) -> None:
        """List a run's metric keys: how many values, the last one and its step."""
        from ckptd import cli

        with query.Reader(cli.home()) as reader:
            info = reader.resolve(run)
            rows = reader.key_stats(info["id"])
        if as_json:
            cli.emit_json(rows)
            return
        own = [r for r in rows if not r["system"]]
        system = [r for r in rows if r["system"]]
        if not rows:
            cli.echo(f"run {info['id']} has logged no metrics yet")
        for group, title in ((own, None), (system, "system (sampled by the daemon):")):
            if not group:
                continue
            if title:
                cli.echo()
                cli.echo(title)
            cli.table([r | {"last": cli.fmt_num(r["last"])} for r in group],
                      ["key", "count", "last", "step"])


__all__ = ["register"]
