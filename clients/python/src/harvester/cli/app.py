"""The `harvester` command: click commands over `harvester.Client`.

Each command prints for people (a terminal: tables, colour, progress) or for programs (piped,
or --format json: one JSON object per line), and exits with the codes of `cli.failures`.
"""

from __future__ import annotations

import datetime
import functools
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, ParamSpec

import click

from harvester.calls import Batch, Task
from harvester.cli import failures, progress
from harvester.cli.render import (
    PROJECT_COLUMNS,
    TASK_COLUMNS,
    Format,
    Printer,
    project_row,
    task_row,
)
from harvester.client import Client
from harvester.connection import (
    DEFAULT_ADDRESS,
    DEFAULT_DEADLINE_SECONDS,
    ENV_ADDRESS,
    ENV_DEADLINE,
    ENV_TLS_CA_FILE,
    ENV_TLS_CERT_FILE,
    ENV_TLS_KEY_FILE,
    ENV_TOKEN,
    Connection,
)
from harvester.errors import HarvesterError
from projects.v1 import task_pb2

P = ParamSpec("P")

ORDERS = {
    "updated": "update_time desc",
    "created": "create_time desc",
    "start": "start_date desc",
    "url": "url",
}
STATUSES = {
    "pending": task_pb2.TASK_STATUS_PENDING,
    "started": task_pb2.TASK_STATUS_STARTED,
    "retry": task_pb2.TASK_STATUS_RETRY,
    "success": task_pb2.TASK_STATUS_SUCCESS,
    "succeeded": task_pb2.TASK_STATUS_SUCCESS,
    "failure": task_pb2.TASK_STATUS_FAILURE,
    "failed": task_pb2.TASK_STATUS_FAILURE,
    "revoked": task_pb2.TASK_STATUS_REVOKED,
    "cancelled": task_pb2.TASK_STATUS_REVOKED,
}


@dataclass
class State:
    """What the root options say, and the one client made from them when a command needs it."""

    connection: Connection
    _client: Client | None = field(default=None, init=False)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(connection=self.connection)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def reports_errors(command: Callable[P, int]) -> Callable[P, int]:
    """A gateway error ends the command with one line on stderr and its exit code."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        state = click.get_current_context().find_object(State)
        assert state is not None
        try:
            return command(*args, **kwargs)
        except HarvesterError as error:
            line = failures.describe(
                error, state.connection.address, state.connection.token is not None
            )
            click.echo(f"harvester: {line}", err=True)
            raise click.exceptions.Exit(failures.exit_code_of(error)) from error

    return wrapper


def format_option(*choices: Format) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    names = [Format.AUTO.value, *(choice.value for choice in choices)]
    return click.option(
        "--format",
        "format_",
        type=click.Choice(names),
        default=Format.AUTO.value,
        show_default=True,
        help="table for people; json: one JSON object per line; auto: table on a terminal, "
        "json when piped.",
    )


class PageRange(click.ParamType):  # type: ignore[type-arg]  # generic only in new click
    """`3` or `1-20`."""

    name = "PAGES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        first, sep, last = text.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            self.fail(f"{text!r} is not a page (3) or a range of pages (1-20)", param, ctx)
        bounds = (int(first), int(last) if sep else None)
        if bounds[1] is not None and bounds[1] < bounds[0]:
            self.fail(f"{text!r}: the last page comes before the first", param, ctx)
        return bounds


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    epilog="Exit codes: 0 done; 1 the task or batch failed or was cancelled; 2 bad usage; "
    "3 the gateway is unreachable or refused the token; 130 interrupted.",
)
@click.option(
    "--address",
    envvar=ENV_ADDRESS,
    show_envvar=True,
    default=DEFAULT_ADDRESS,
    help="host:port of the gateway.",
)
@click.option(
    "--token",
    envvar=ENV_TOKEN,
    show_envvar=True,
    default=None,
    help="Bearer token (make run prints one; a deployment's are its API_TOKENS).",
)
@click.option(
    "--tls-ca-file",
    envvar=ENV_TLS_CA_FILE,
    show_envvar=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA certificate (PEM) of a TLS gateway; unset: plaintext.",
)
@click.option(
    "--tls-cert-file",
    envvar=ENV_TLS_CERT_FILE,
    show_envvar=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Client certificate (PEM) for a gateway that asks for one (mutual TLS).",
)
@click.option(
    "--tls-key-file",
    envvar=ENV_TLS_KEY_FILE,
    show_envvar=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Private key (PEM) of --tls-cert-file.",
)
@click.option(
    "--deadline",
    envvar=ENV_DEADLINE,
    show_envvar=True,
    type=click.FloatRange(min=0.1),
    default=DEFAULT_DEADLINE_SECONDS,
    help="Seconds each call may take before it is tried again or given up.",
)
@click.pass_context
def root(
    ctx: click.Context,
    address: str,
    token: str | None,
    tls_ca_file: Path | None,
    tls_cert_file: Path | None,
    tls_key_file: Path | None,
    deadline: float,
) -> None:
    """Harvest listing pages and read the projects, through the harvester's gateway.

    \b
    Examples:
      export HARVESTER_TOKEN=...            # the token make run printed
      harvester upload 3                    # enqueue page 3
      harvester upload 1-20 --wait          # a batch, with a live progress bar
      harvester projects --active --query bot
      harvester projects watch --cursor-file feed.cursor
    """
    if (tls_cert_file is None) != (tls_key_file is None):
        raise click.UsageError("--tls-cert-file and --tls-key-file go together")
    state = State(
        Connection(
            address=address,
            token=token or None,
            tls_ca_file=tls_ca_file,
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
            deadline=deadline,
        )
    )
    ctx.obj = state
    ctx.call_on_close(state.close)


def _follow(printer: Printer, client: Client, first: Task | Batch) -> int:
    """Follow a task or batch to its end (bar or spinner for people, JSON lines for programs);
    on Ctrl-C offer to cancel it. The exit code."""
    try:
        states = client.watch(first.id)
        if printer.for_people:
            if isinstance(first, Batch):
                last: Task | Batch = progress.follow_batch(printer.console, states, first)
            else:
                last = progress.follow_task(printer.console, states, first)
            printer.item(last)
        else:
            last = first
            for state in states:
                if state != last:
                    printer.item(state)
                last = state
        return failures.exit_code_for(last)
    except KeyboardInterrupt:
        return _interrupted(printer, client, first)


def _interrupted(printer: Printer, client: Client, item: Task | Batch) -> int:
    kind = "batch" if isinstance(item, Batch) else "task"
    if sys.stdin.isatty():
        try:
            cancel = click.confirm(f"\nCancel {kind} {item.id}?", default=False, err=True)
        except click.Abort:
            cancel = False
        if cancel:
            cancelled = client.cancel(item.id)
            printer.item(cancelled)
            return failures.FAILED
    click.echo(
        f"harvester: stopped watching; {kind} {item.id} goes on "
        f"(harvester status {item.id} --watch; harvester cancel {item.id})",
        err=True,
    )
    return failures.INTERRUPTED


@root.command()
@click.argument("pages", type=PageRange())
@click.option(
    "--until-known",
    is_flag=True,
    help="Stop after the first page on which nothing was new (needs a range).",
)
@click.option("--wait", is_flag=True, help="Follow it to the end: a progress bar per batch.")
@click.option("--request-id", help="Idempotency key; made up when not given.")
@format_option(Format.TABLE, Format.JSON)
@click.pass_obj
@reports_errors
def upload(
    state: State,
    pages: tuple[int, int | None],
    until_known: bool,
    wait: bool,
    request_id: str | None,
    format_: str,
) -> int:
    """Enqueue the harvest of a page, or of a range of pages as one batch.

    \b
    Examples:
      harvester upload 3
      harvester upload 1-20 --until-known --wait
    With --wait it follows the batch (or task) to its end; Ctrl-C then asks whether to cancel
    it. Exit code 1 if it failed or was cancelled.
    """
    printer = Printer(Format(format_))
    first, last = pages
    if last is None and until_known:
        raise click.UsageError("--until-known needs a range of pages, e.g. 1-50")
    item: Task | Batch
    if last is None:
        item = state.client.upload(first, request_id=request_id)
    else:
        item = state.client.upload_pages(
            first, last, until_known=until_known, request_id=request_id
        )
    if not wait:
        printer.item(item)
        return failures.DONE
    if not printer.for_people:
        printer.item(item)
    return _follow(printer, state.client, item)


@root.command()
@click.argument("id_", metavar="ID")
@click.option("--watch", is_flag=True, help="Follow it until it ends.")
@format_option(Format.TABLE, Format.JSON)
@click.pass_obj
@reports_errors
def status(state: State, id_: str, watch: bool, format_: str) -> int:
    """Show a task or a batch by its id.

    \b
    Examples:
      harvester status 0b9c...            # as it is now
      harvester status 0b9c... --watch    # and every change until it ends
    Exit code 1 if it failed or was cancelled.
    """
    printer = Printer(Format(format_))
    item = state.client.status(id_)
    if not watch or item.status in (
        task_pb2.TASK_STATUS_SUCCESS,
        task_pb2.TASK_STATUS_FAILURE,
        task_pb2.TASK_STATUS_REVOKED,
    ):
        printer.item(item)
        return failures.exit_code_for(item)
    if not printer.for_people:
        printer.item(item)
    return _follow(printer, state.client, item)


@root.command()
@click.argument("id_", metavar="ID")
@format_option(Format.TABLE, Format.JSON)
@click.pass_obj
@reports_errors
def cancel(state: State, id_: str, format_: str) -> int:
    """Cancel a task or a batch: what has not run never will.

    \b
    Example:
      harvester cancel 0b9c...
    """
    Printer(Format(format_)).item(state.client.cancel(id_))
    return failures.DONE


@root.command()
@click.option(
    "--status",
    "status_",
    type=click.Choice(sorted(STATUSES)),
    help="Only tasks in this state.",
)
@click.option("--batch", "batch_id", default="", help="Only the pages of this batch.")
@click.option("--limit", type=click.IntRange(min=0), default=100, help="At most this many; 0: all.")
@format_option(Format.TABLE, Format.JSON, Format.CSV)
@click.pass_obj
@reports_errors
def tasks(state: State, status_: str | None, batch_id: str, limit: int, format_: str) -> int:
    """List your tasks, newest first.

    \b
    Examples:
      harvester tasks --status failed
      harvester tasks --batch 0b9c... --format csv > pages.csv
    """
    found = state.client.tasks(
        status=STATUSES[status_] if status_ else None, batch_id=batch_id, limit=limit or None
    )
    Printer(Format(format_)).rows("tasks", TASK_COLUMNS, found, task_row, "task")
    return failures.DONE


@root.group(invoke_without_command=True)
@click.option("--active/--inactive", "is_active", default=None, help="Only (in)active projects.")
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"]),
    help="Only projects changed after this (UTC unless it says otherwise).",
)
@click.option("--query", default="", help="Only projects whose title or description has this.")
@click.option("--order", type=click.Choice(list(ORDERS)), default="updated", help="Sort order.")
@click.option("--limit", type=click.IntRange(min=0), default=100, help="At most this many; 0: all.")
@format_option(Format.TABLE, Format.JSON, Format.CSV)
@click.pass_context
@reports_errors
def projects(
    ctx: click.Context,
    is_active: bool | None,
    since: datetime.datetime | None,
    query: str,
    order: str,
    limit: int,
    format_: str,
) -> int:
    """List the harvested projects (or watch them change: `harvester projects watch`).

    \b
    Examples:
      harvester projects --active --since 2026-11-01 --query bot
      harvester projects --order url --limit 0 --format csv > projects.csv
    """
    if ctx.invoked_subcommand is not None:
        return failures.DONE
    state = ctx.find_object(State)
    assert state is not None
    found = state.client.list_projects(
        is_active=is_active,
        updated_after=since,
        query=query,
        order_by=ORDERS[order],
        limit=limit or None,
    )
    Printer(Format(format_)).rows("projects", PROJECT_COLUMNS, found, project_row, "project")
    return failures.DONE


def _read_cursor(cursor_file: Path | None) -> str | None:
    if cursor_file is None or not cursor_file.exists():
        return None
    return cursor_file.read_text().strip() or None


def _save_cursor(cursor_file: Path, cursor: str) -> None:
    """Atomically: a watcher killed while writing leaves the previous cursor, never half."""
    partial = cursor_file.with_name(cursor_file.name + ".partial")
    partial.write_text(cursor + "\n")
    os.replace(partial, cursor_file)


@projects.command("watch")
@click.option("--cursor", help="Resume after this cursor (a cursor a watch printed).")
@click.option(
    "--cursor-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Resume from the cursor kept in this file, and keep the latest one there.",
)
@click.option(
    "--from-beginning", is_flag=True, help="With no cursor: every project ever stored first."
)
@click.option("--active/--inactive", "is_active", default=None, help="Only (in)active projects.")
@format_option(Format.TABLE, Format.JSON)
@click.pass_obj
@reports_errors
def watch_projects(
    state: State,
    cursor: str | None,
    cursor_file: Path | None,
    from_beginning: bool,
    is_active: bool | None,
    format_: str,
) -> int:
    """Print a line per project as harvests create or change it, until Ctrl-C.

    \b
    Examples:
      harvester projects watch                         # what changes from now on
      harvester projects watch --cursor-file f.cursor  # resume where the last run stopped
      harvester projects watch --from-beginning --format json | jq .project.title
    It reconnects by itself after a gateway restart, missing nothing.
    """
    printer = Printer(Format(format_))
    start = cursor or _read_cursor(cursor_file)
    _stop_on_sigterm()
    changes = state.client.watch_projects(start, from_beginning=from_beginning, is_active=is_active)
    try:
        for change in changes:
            printer.change(change)
            if cursor_file is not None and change.cursor:
                _save_cursor(cursor_file, change.cursor)
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM: the way a watch ends
    finally:
        changes.close()
    return failures.DONE


def _stop_on_sigterm() -> None:
    """SIGTERM ends a watch as Ctrl-C does: by a KeyboardInterrupt where it waits."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


@root.command()
@format_option(Format.TABLE, Format.JSON)
@click.pass_obj
@reports_errors
def health(state: State, format_: str) -> int:
    """Say whether the gateway, its broker and its database are serving (no token needed).

    \b
    Example:
      harvester health && echo ready
    Exit code 1 when NOT_SERVING, 3 when the gateway is unreachable.
    """
    printer = Printer(Format(format_))
    serving = state.client.health()
    name = "SERVING" if serving else "NOT_SERVING"
    if printer.for_people:
        printer.console.print(
            f"gateway {state.connection.address}: [{'green' if serving else 'red'}]{name}[/]"
        )
    else:
        printer.json_line({"address": state.connection.address, "status": name})
    return failures.DONE if serving else failures.FAILED


def main(argv: list[str] | None = None) -> NoReturn:
    """The console script: run a command, exit with its code."""
    try:
        code: Any = root.main(args=argv, prog_name="harvester", standalone_mode=False)
    except click.exceptions.Exit as stop:
        code = stop.exit_code
    except click.ClickException as error:
        error.show()
        code = error.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("harvester: interrupted", err=True)
        code = failures.INTERRUPTED
    sys.exit(code if isinstance(code, int) else failures.DONE)
