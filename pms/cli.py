"""The ``pms`` command: run, seed, replay, export, back up and deploy the platform.

Each command is a thin shell over a function in the module that owns the work, so the
logic stays testable without the CLI.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from pms.settings import Settings, UnknownSettingsError, get_settings

app = typer.Typer(help="Patient management & analytics platform.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
infra_app = typer.Typer(help="Deploy the containers to AWS ECS (or LocalStack / moto).", no_args_is_help=True)
app.add_typer(infra_app, name="infra")
console = Console(stderr=True)


def _say_error(message: str) -> None:
    """One red ``error:`` line. Never Rich markup: messages quote what was typed (``pms restore 'x[/]'``
    raised a MarkupError traceback) and config values."""
    console.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    """:func:`_say_error`, then exit with ``code`` (no traceback)."""
    _say_error(message)
    raise typer.Exit(code)


def _settings_or_exit() -> Settings:
    """The settings, or one readable line per problem and exit code 2 (no traceback)."""
    from pydantic import ValidationError

    try:
        return get_settings()
    except UnknownSettingsError as exc:
        for problem in str(exc).split("; "):
            _say_error(f"invalid configuration: {problem}")
        raise typer.Exit(2) from None
    except ValidationError as exc:
        for error in exc.errors():
            where = "__".join(str(part) for part in error["loc"]).upper()
            _say_error(f"invalid configuration{' PMS_' + where if where else ''}: {error['msg']}")
        raise typer.Exit(2) from None


@app.command()
def up(
    only: Annotated[list[str] | None, typer.Option(help="Start only these services (and what they need).")] = None,
) -> None:
    """Start embedded PostgreSQL + broker and every service; Ctrl-C stops everything."""
    from pms.supervisor import Supervisor

    raise typer.Exit(Supervisor(_settings_or_exit(), only=only).run())


@app.command()
def status() -> None:
    """Show which services of a running `pms up` answer, and where (exit 0 all up, 1 some down, 3 not running)."""
    from pms.supervisor import print_status

    raise typer.Exit(print_status(_settings_or_exit()))


@app.command()
def serve(name: Annotated[str, typer.Argument(help="Service name from the registry.")]) -> None:
    """Run one service in the foreground (what `pms up` and the containers run)."""
    from pms.registry import by_name
    from pms.serve import serve as run_service

    try:
        by_name(name)
    except KeyError as exc:
        _fail(exc.args[0], 2)
    run_service(name, _settings_or_exit())


@app.command()
def migrate(database: Annotated[str | None, typer.Argument(
        help="auth|patients|billing|analytics (or the service name: patient)")] = None) -> None:
    """Apply Alembic migrations to one service database, or to all of them."""
    from pms import db
    from pms.settings import SERVICE_DATABASES

    database = {"patient": "patients"}.get(database or "", database)  # every other command names the service
    if database is not None and database not in SERVICE_DATABASES:
        _fail(f"unknown database {database!r}; one of {', '.join(SERVICE_DATABASES)}", 2)
    settings = _settings_or_exit()
    for name in [database] if database else list(SERVICE_DATABASES):
        db.migrate(settings, name)
        console.print(f"[green]migrated[/] {name}")


@app.command()
def seed(
    patients: Annotated[int, typer.Option(min=1, help="How many synthetic patients to create.")] = 1000,
    seed_value: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same patients.")] = 42,
) -> None:
    """Create realistic synthetic patients through the service layer and outbox."""
    from api.patient import seed as patient_seed

    created = patient_seed.run(_settings_or_exit(), patients=patients, seed=seed_value)
    skipped = patients - created
    console.print(f"[green]created[/] {created} patient(s)" + (
        f"; {skipped} skipped: their e-mail is already used (the same --seed makes the same patients;"
        " choose another for new ones)" if skipped else ""), highlight=False)


@app.command()
def replay(
    since: Annotated[datetime | None, typer.Option("--from", formats=["%Y-%m-%d"],
                                                   help="Only events on or after this date (YYYY-MM-DD).")] = None,
) -> None:
    """Republish the outbox history to the broker (to rebuild analytics)."""
    import psycopg
    from confluent_kafka import KafkaException
    from sqlalchemy.exc import OperationalError

    from api.patient import replay as patient_replay

    settings = _settings_or_exit()
    try:
        sent = patient_replay.run(settings, since=since.date() if since else None)
    except patient_replay.ReplayFailed as exc:
        _fail(f"{exc}; run `pms replay` again (it is safe to repeat)")
    except KafkaException as exc:
        _fail(f"the broker at {settings.bootstrap_servers} did not answer "
              f"({exc.args[0].str() if exc.args else exc}); is `pms up` running?")
    except (OperationalError, psycopg.OperationalError) as exc:
        url = settings.server_url()
        _fail(f"cannot read the outbox from PostgreSQL at {url.host}:{url.port} ({type(exc).__name__}); "
              "is `pms up` running?")
    console.print(f"republished {sent} events to {settings.kafka.topic!r}", highlight=False)


class ExportFormat(StrEnum):
    PARQUET = "parquet"
    CSV = "csv"


@app.command()
def export(
    fmt: Annotated[ExportFormat, typer.Option("--format", help="File format.")] = ExportFormat.PARQUET,
    table: Annotated[list[str] | None, typer.Option(help="Tables to export (default: all).")] = None,
    to: Annotated[Path, typer.Option(help="Output folder.")] = Path("export"),
) -> None:
    """Write the analytics tables to Parquet or CSV files."""
    from pms.errors import PMSError
    from stream_processing import export as analytics_export

    try:
        analytics_export.run(_settings_or_exit(), fmt=fmt.value, tables=table, out_dir=to)
    except PMSError as exc:  # e.g. an unknown table: say which are valid, no traceback
        _fail(exc.message, 2)
    except OSError as exc:  # the output folder cannot be made or written
        _fail(f"cannot write to {to}: {exc.strerror or exc}")


@app.command()
def notebooks() -> None:
    """Open JupyterLab on the analyst notebooks with the read-only analytics connection."""
    from pms import notebook as pms_notebook

    pms_notebook.launch(_settings_or_exit())


@app.command()
def backup(to: Annotated[Path | None, typer.Option(help="Backup folder (default: <data_dir>/backups/<time>).")] = None
           ) -> None:
    """Dump every service database (pg_dump custom format) with a checksummed manifest."""
    from pms import backup as pms_backup

    try:
        pms_backup.backup(_settings_or_exit(), to=to)
    except pms_backup.BackupError as exc:
        _fail(str(exc))


@app.command()
def restore(source: Annotated[Path, typer.Argument(help="A folder written by `pms backup`.")]) -> None:
    """Restore every database from a backup folder into a stopped or empty system."""
    from pms import backup as pms_backup

    try:
        pms_backup.restore(_settings_or_exit(), source=source)
    except pms_backup.BackupError as exc:
        _fail(str(exc))


@infra_app.command("deploy")
def infra_deploy(endpoint_url: Annotated[str | None, typer.Option(help="AWS endpoint (LocalStack/moto).")] = None
                 ) -> None:
    """Create or update the ECS stack; a second run changes nothing."""
    from infra import cli as infra_cli

    infra_cli.deploy(_settings_or_exit(), endpoint_url=endpoint_url)


@infra_app.command("status")
def infra_status(endpoint_url: Annotated[str | None, typer.Option()] = None) -> None:
    """Show the deployed stack and its load balancer address (exit 0 healthy, 1 unhealthy, 3 not deployed)."""
    from infra import cli as infra_cli

    raise typer.Exit(infra_cli.exit_code(infra_cli.status(_settings_or_exit(), endpoint_url=endpoint_url)))


@infra_app.command("destroy")
def infra_destroy(endpoint_url: Annotated[str | None, typer.Option()] = None) -> None:
    """Delete every resource of the stack."""
    from infra import cli as infra_cli

    infra_cli.destroy(_settings_or_exit(), endpoint_url=endpoint_url)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
