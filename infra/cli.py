"""``pms infra deploy|status|destroy``: the desired stack (infra.stack) applied by infra.aws, with rich output.

The functions take the platform :class:`~pms.settings.Settings` (``settings.infra`` holds
stack name, region, image and sizes) and an optional ``endpoint_url`` for LocalStack or
moto; they return what they did so tests and scripts need not parse the console.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from rich.console import Console
from rich.table import Table

from infra import aws
from infra.stack import Stack, StackError, desired_stack
from pms.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")

#: Exit codes of ``pms infra status`` (the same meanings as ``pms status``).
EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_NOT_DEPLOYED = 3

_ACTION_STYLE = {"create": "[green]+ create[/]", "update": "[yellow]~ update[/]", "delete": "[red]- delete[/]",
                 "run": "[cyan]> run[/]", "unchanged": "[dim]= unchanged[/]"}


def _console(console: Console | None) -> Console:
    return console or Console(stderr=True)


def _printer(console: Console, *, verbose: bool) -> Callable[[aws.Change], None]:
    def show(change: aws.Change) -> None:
        if verbose or change.action != "unchanged":
            console.print(f"  {_ACTION_STYLE[change.action]} {change.resource} [bold]{change.name}[/]")

    return show


@contextmanager
def _waiting(console: Console, settings: Settings) -> Iterator[aws.Waiter]:
    """A waiter that shows a rich spinner naming what it waits for."""
    with console.status("working...", spinner="dots") as spinner:
        def label(text: str) -> None:
            spinner.update(f"waiting for {text} (up to {settings.infra.wait_timeout_s:.0f}s)")

        yield aws.polling_waiter(timeout=settings.infra.wait_timeout_s,
                                 interval=settings.infra.poll_interval_s, on_wait=label)


def _fails_cleanly(func: Callable[P, R]) -> Callable[P, R]:
    """Turn an InfraError into one red line and exit status 1 (the cause stays chained)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (aws.InfraError, BotoCoreError, ClientError) as exc:
            _console(kwargs.get("console")).print(f"[red]infra {func.__name__} failed:[/] {exc}")  # type: ignore[arg-type]
            raise SystemExit(1) from exc

    return wrapper


def _lb_url(settings: Settings, dns: str | None) -> str:
    return f"{'https' if settings.infra.certificate_arn else 'http'}://{dns}"


def _stack(settings: Settings) -> Stack:
    try:
        return desired_stack(settings)
    except StackError as exc:
        raise aws.InfraError(str(exc)) from exc


@_fails_cleanly
def deploy(settings: Settings, endpoint_url: str | None = None, *, console: Console | None = None,
           verbose: bool = False) -> aws.Report:
    """Create or update the stack; a second run with the same settings changes nothing and says so."""
    out = _console(console)
    stack = _stack(settings)
    clients = aws.Clients.connect(stack.region, endpoint_url)
    report = aws.Report(on_change=_printer(out, verbose=verbose))
    out.print(f"[bold]Deploying stack {stack.name}[/] to {endpoint_url or 'AWS'} ({stack.region}), "
              f"image {stack.image}")
    with _waiting(out, settings) as wait:
        deployed = aws.Deployer(stack, clients, report=report, wait=wait).deploy()
    if report.changed:
        out.print(f"[green]Done:[/] {len(report.changed)} change(s), "
                  f"{len(report.changes) - len(report.changed)} resource(s) already as desired.")
    else:
        out.print(f"[green]No changes:[/] all {len(report.changes)} resources already match the desired stack.")
    out.print(f"Load balancer: [bold]{_lb_url(settings, deployed.load_balancer_dns)}[/] "
              f"(dashboard at /, REST API at /api, /auth)")
    if not settings.infra.certificate_arn:
        out.print("[yellow]Warning:[/] plain HTTP: set PMS_INFRA__CERTIFICATE_ARN (ACM) before real patient "
                  "data goes through this load balancer.")
    out.print(f"Admin password: secret [bold]{stack.secret('admin-password').name}[/] in Secrets Manager.")
    return report


@_fails_cleanly
def status(settings: Settings, endpoint_url: str | None = None, *, console: Console | None = None
           ) -> aws.StackStatus:
    """Print what exists of the stack, each service's running/desired tasks, the load balancer address,
    and every reason the stack is not healthy (:func:`exit_code` turns the result into the exit status).
    """
    out = _console(console)
    stack = _stack(settings)
    result = aws.status(stack, aws.Clients.connect(stack.region, endpoint_url))
    if not result.exists:
        out.print(f"Stack [bold]{stack.name}[/] is not deployed ({endpoint_url or 'AWS'}, {stack.region}).")
        return result
    resources = Table(title=f"stack {stack.name}")
    for column in ("resource", "name", "state"):
        resources.add_column(column)
    for kind, name, state in result.resources:
        resources.add_row(kind, name, state)
    out.print(resources)
    services = Table(title="ECS services")
    for column in ("service", "running/desired", "task definition", "status"):
        services.add_column(column)
    for svc in result.services:
        style = "green" if svc.running >= svc.desired else "yellow"
        services.add_row(svc.name, f"[{style}]{svc.running}/{svc.desired}[/]", svc.task_definition, svc.status)
    out.print(services)
    if result.load_balancer_dns:
        out.print(f"Load balancer: [bold]{_lb_url(settings, result.load_balancer_dns)}[/]")
    problems = result.problems
    if problems:
        out.print(f"[red]Stack {stack.name} is not healthy[/] ({len(problems)} problem(s)):")
        for problem in problems:
            out.print(f"  [red]-[/] {problem}", highlight=False)
    else:
        out.print(f"[green]Stack {stack.name} is healthy:[/] every service runs its desired task count.")
    return result


def exit_code(result: aws.StackStatus) -> int:
    """0 healthy, 1 deployed but something is missing, stopped or short of tasks, 3 not deployed."""
    if not result.exists:
        return EXIT_NOT_DEPLOYED
    return EXIT_HEALTHY if result.healthy else EXIT_UNHEALTHY


@_fails_cleanly
def destroy(settings: Settings, endpoint_url: str | None = None, *, console: Console | None = None) -> aws.Report:
    """Delete every resource of the stack (the database without a final snapshot: back up first)."""
    out = _console(console)
    stack = _stack(settings)
    clients = aws.Clients.connect(stack.region, endpoint_url)
    report = aws.Report(on_change=_printer(out, verbose=False))
    out.print(f"[bold]Destroying stack {stack.name}[/] on {endpoint_url or 'AWS'} ({stack.region})")
    with _waiting(out, settings) as wait:
        aws.Destroyer(stack, clients, report=report, wait=wait).destroy()
    if report.changed:
        out.print(f"[green]Done:[/] deleted {len(report.changed)} resource(s).")
    else:
        out.print("Nothing to delete: the stack does not exist.")
    return report
