"""``ckptd ckpt ...``: the command-line skin of :mod:`ckptd.checkpoints`.

``ls`` and ``export`` only read (the store read-only, the files directly), so
they work without a daemon; ``verify`` and ``gc`` change state and go
through the daemon, the only writer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from ckptd_client import transport
from ckptd_client.checkpoint.format import human_bytes
from ckptd_client.errors import CheckpointError, CkptdError

from ckptd.store import query

#: Fields of ``ckpt ls --json`` (SPEC section 5); more may be added, none renamed.
LS_FIELDS = ("step", "status", "bytes", "hash", "metrics", "blocked_s", "persist_s")


def _age(t: float | None) -> str:
    if t is None:
        return "-"
    s = max(0.0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit}"
    return f"{s:.0f}s"


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}s"


def register(app: typer.Typer) -> None:
    ckpt = typer.Typer(no_args_is_help=True, help="List, verify, prune and export checkpoints.")
    app.add_typer(ckpt, name="ckpt")

    @ckpt.command("ls")
    def ls_cmd(run: str | None = typer.Argument(None, help="run id, prefix or name "
                                                "(default: newest run)"),
               as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
               ) -> None:
        """List a run's checkpoints: step, size, age, status, metrics, blocked/persist times."""
        from ckptd import cli

        with query.Reader(cli.home()) as reader:
            info = reader.resolve(run)
            rows = reader.checkpoints(info["id"])
        if as_json:
            cli.emit_json([{k: r.get(k) for k in LS_FIELDS} | {"created": r.get("created"),
                                                                "reason": r.get("reason")}
                           for r in rows])
            return
        if not rows:
            cli.echo(f"run {info['id']} has no checkpoints")
            return
        table = []
        for r in rows:
            table.append({
                "step": r["step"], "status": r["status"],
                "size": human_bytes(r["bytes"]) if r["bytes"] is not None else None,
                "age": _age(r["created"]), "hash": (r["hash"] or "")[7:19] or None,
                "blocked": _seconds(r["blocked_s"]), "persist": _seconds(r["persist_s"]),
                "metrics": " ".join(f"{k}={cli.fmt_num(v)}" for k, v in r["metrics"].items())
                or None,
            })
        cli.table(table, ["step", "status", "size", "age", "hash", "blocked", "persist",
                          "metrics"])

    @ckpt.command("verify")
    def verify_cmd(run: str | None = typer.Argument(None, help="run id, prefix or name "
                                                    "(default: newest run)")) -> None:
        """Re-hash every checkpoint of a run; exit non-zero naming any corrupt one."""
        from ckptd import cli
        from ckptd.daemon.checkpoints import PRUNED

        run_id = _resolve(cli.home(), run)
        results = transport.call(cli.home(), "ckpt_verify", {"run": run_id}, timeout=3600)
        bad = [r for r in results if r["status"] not in ("committed", PRUNED)]
        for r in results:
            if r["status"] == "committed":
                cli.echo(f"ok       step {r['step']}")
            elif r["status"] == PRUNED:
                cli.echo(f"gone     step {r['step']}: {r['reason']}")
            else:
                cli.echo(f"CORRUPT  step {r['step']}: {r['reason']}")
        if bad:
            raise CheckpointError(
                f"verify: run {run_id} has {len(bad)} corrupt checkpoint(s): step "
                + ", ".join(str(r["step"]) for r in bad)
                + "; restore skips them, `ckptd ckpt gc` deletes them")
        ok = sum(r["status"] == "committed" for r in results)
        cli.echo(f"{ok} checkpoint(s) of run {run_id} verified")

    @ckpt.command("gc")
    def gc_cmd(run: str | None = typer.Argument(None, help="run id, prefix or name "
                                                "(default: every run)")) -> None:
        """Delete corrupt checkpoints and apply the run's retention policy now."""
        from ckptd import cli

        run_id = _resolve(cli.home(), run) if run is not None else None
        deleted = transport.call(cli.home(), "ckpt_gc", {"run": run_id}, timeout=3600)
        for d in deleted:
            cli.echo(f"deleted  {d['run']} step {d['step']} ({d['reason']})")
        cli.echo(f"{len(deleted)} checkpoint(s) deleted")

    @ckpt.command("export")
    def export_cmd(run: str | None = typer.Argument(None, help="run id, prefix or name "
                                                    "(default: newest run)"),
                   step: int | None = typer.Option(None, "--step",
                                                   help="this step (default: newest)"),
                   output: Path = typer.Option(..., "-o", "--output",
                                               help="file to write (a new directory for "
                                                    "--format dcp)"),
                   fmt: str = typer.Option("torch", "--format",
                                           help="torch (torch.save, loads with "
                                                "weights_only=True), safetensors, or dcp "
                                                "(a torch.distributed.checkpoint directory)"),
                   ) -> None:
        """Write one checkpoint as a plain torch.save or safetensors file, or a DCP
        directory (`dcp.load(state, checkpoint_id=DIR)`, no process group needed)."""
        from ckptd import cli
        from ckptd.daemon.checkpoints import export

        write = write_dir = None
        if fmt == "safetensors":
            from ckptd.exports.safetensors import write
        elif fmt == "dcp":
            from ckptd.exports.dcp import write_dir
        elif fmt != "torch":
            raise CkptdError(f"ckpt export: --format {fmt!r} is not one of torch, "
                             "safetensors, dcp")

        with query.Reader(cli.home()) as reader:
            info = reader.resolve(run)

        def list_rows() -> list[dict[str, Any]]:
            with query.Reader(cli.home()) as reader:
                return reader.checkpoints(info["id"])

        result = export(cli.home(), info["id"], list_rows, step, output, write, write_dir)
        cli.echo(f"exported {info['id']} step {result['step']} to {result['path']} "
                 f"({human_bytes(result['bytes'])})")


def _resolve(home: Path, run: str | None) -> str:
    with query.Reader(home) as reader:
        info: dict[str, Any] = reader.resolve(run)
    return str(info["id"])
