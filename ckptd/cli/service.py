"""``ckptd service install|uninstall|status``: the command-line skin of :mod:`ckptd.service`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    service_app = typer.Typer(help="Run the daemon as a systemd user service, started at boot.",
                              no_args_is_help=True)
    app.add_typer(service_app, name="service")

    @service_app.command("install")
    def install_cmd() -> None:
        """Write the user unit, enable and start it, and enable lingering."""
        from ckptd import cli
        from ckptd.supervise import service

        for step in service.install(cli.home()):
            cli.echo(("ok    " if step.ok else "skip  ") + step.text)

    @service_app.command("uninstall")
    def uninstall_cmd() -> None:
        """Stop and disable the user unit and remove it."""
        from ckptd import cli
        from ckptd.supervise import service

        for step in service.uninstall():
            cli.echo(("ok    " if step.ok else "skip  ") + step.text)

    @service_app.command("status")
    def status_cmd(as_json: bool = typer.Option(False, "--json",
                                                help="machine-readable output")) -> None:
        """Say whether the unit is installed, enabled, active, and lingering is on."""
        from ckptd import cli
        from ckptd.supervise import service

        info = service.status()
        if as_json:
            cli.emit_json(info)
            return
        cli.echo(f"unit:      {info['unit']} ({'installed' if info['installed'] else 'absent'})")
        if info["systemd"]:
            cli.echo(f"enabled:   {info['enabled']}")
            cli.echo(f"active:    {info['active']}")
        else:
            cli.echo(f"systemd:   not reachable ({info['detail']})")
        cli.echo(f"linger:    {'on' if info['linger'] else 'off'}")
