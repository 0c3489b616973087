"""``ckptd run`` and ``ckptd resume``: the command-line skin of
:mod:`ckptd.supervise` and :mod:`ckptd.resume`."""

from __future__ import annotations

import sys

import typer
from ckptd_client.errors import CkptdError, ResumeRefused, UsageError
from ckptd_client.identity import valid_run_id


def register(app: typer.Typer) -> None:
    @app.command(
        "run",
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
    )
    def run_cmd(
        command: list[str] = typer.Argument(None, help="the command to run, after --"),
        name: str | None = typer.Option(None, "--name", help="a name for the run"),
        auto_resume: bool = typer.Option(
            False, "--auto-resume",
            help="relaunch it from its newest checkpoint when it is interrupted or crashes "
                 "(also after a reboot, when the daemon runs as a service)"),
        max_restarts: int | None = typer.Option(
            None, "--max-restarts", min=0,
            help="with --auto-resume: relaunch at most this many times (default 10)"),
        stop_grace: float | None = typer.Option(
            None, "--stop-grace", min=0,
            help="seconds the command gets to exit after SIGTERM/SIGINT/SIGHUP before its "
                 "process group is killed (default 30, or $CKPTD_STOP_GRACE)"),
        group: str | None = typer.Option(None, "--group", help="put the run in this group "
                                         "(compare groups with `ckptd compare @G1 @G2`)"),
        requeue: bool = typer.Option(
            False, "--requeue",
            help="under SLURM: after an attempt preempted (it checkpointed and exited), "
                 "`scontrol requeue $SLURM_JOB_ID`; the requeued job continues the run"),
        run_id: str | None = typer.Option(None, "--run-id", hidden=True),
        attach_run: str | None = typer.Option(None, "--attach-run", hidden=True),
        force: bool = typer.Option(False, "--force", hidden=True),
        after_attempt: int | None = typer.Option(None, "--after-attempt", hidden=True),
        report_fd: int | None = typer.Option(None, "--report-fd", hidden=True),
    ) -> None:
        """Run CMD under supervision: record how to relaunch it, capture its output."""
        from ckptd import cli

        if attach_run is not None:
            raise typer.Exit(_attach(cli.home(), attach_run, force, after_attempt, report_fd,
                                     stop_grace))
        if not command:
            raise UsageError("run: give the command to run after --, e.g. "
                             "`ckptd run -- python train.py`")
        if max_restarts is not None and not auto_resume:
            raise UsageError("run: --max-restarts only makes sense with --auto-resume")
        from ckptd.supervise.supervisor import run_command

        if group is not None and not group.strip():
            raise CkptdError("run: --group must not be empty")
        if run_id is not None and not valid_run_id(run_id):
            raise CkptdError(f"run: --run-id {run_id!r} is not a valid run id")
        raise typer.Exit(run_command(cli.home(), list(command), name=name,
                                     auto_resume=auto_resume, max_restarts=max_restarts,
                                     stop_grace=stop_grace, group=group, run_id=run_id,
                                     requeue=requeue))

    @app.command("resume")
    def resume_cmd(
        run: str | None = typer.Argument(None, help="run id, unique prefix or name "
                                                    "(default: the newest run)"),
        detach: bool = typer.Option(False, "--detach",
                                    help="run it in the background and return at once"),
        force: bool = typer.Option(False, "--force",
                                   help="resume even a run that is running or finished"),
        stop_grace: float | None = typer.Option(
            None, "--stop-grace", min=0,
            help="seconds the command gets to exit after a stop signal before it is killed "
                 "(default 30, or $CKPTD_STOP_GRACE)"),
    ) -> None:
        """Relaunch an interrupted run from its newest verified checkpoint."""
        from ckptd import cli
        from ckptd.supervise.resume import resume

        raise typer.Exit(resume(cli.home(), run, detach=detach, force=force, out=cli.echo,
                                stop_grace=stop_grace))


def _attach(home: object, run_id: str, force: bool, after_attempt: int | None,
            report_fd: int | None, stop_grace: float | None = None) -> int:
    """The detached supervisor's entry (``resume --detach``, auto-resume)."""
    from pathlib import Path

    from ckptd.supervise.resume import begin_attempt, write_report
    from ckptd.supervise.supervisor import attach_run

    assert isinstance(home, Path)
    try:
        begun = begin_attempt(home, run_id, force=force, after_attempt=after_attempt)
    except CkptdError as exc:
        if report_fd is not None:
            write_report(report_fd, {"ok": False, "error": str(exc),
                                     "kind": type(exc).__name__})
        if isinstance(exc, ResumeRefused) and after_attempt is not None:
            # auto-resume lost a race (a person resumed it first): nothing to do
            print(f"ckptd: {exc}", file=sys.stderr)
            return 0
        raise
    if report_fd is not None:
        write_report(report_fd, {"ok": True, "begun": {k: begun[k] for k in
                                                       ("id", "attempt", "name")}})
    print(f"ckptd: run {run_id} attempt {begun['attempt']}: {' '.join(begun['command'])}",
          file=sys.stderr, flush=True)
    return attach_run(home, begun, stop_grace)
