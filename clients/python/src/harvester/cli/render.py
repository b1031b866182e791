"""How the command shows things: for people, tables and one-line summaries with colour; for
programs, one JSON object per line (the proto3 JSON mapping, as grpcurl prints it, with every
field and int64s as numbers) or CSV.
"""

from __future__ import annotations

import csv
import enum
import json
import sys
from collections.abc import Iterable, Sequence
from typing import IO, Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from harvester.calls import Batch, Project, Task, WatchedChange
from projects.v1 import project_pb2, task_pb2


class Format(enum.StrEnum):
    AUTO = "auto"  # table on a terminal, JSON lines when piped
    TABLE = "table"
    JSON = "json"
    CSV = "csv"


def resolve(format_: Format, stream: IO[str] | None = None) -> Format:
    """`auto` made concrete: a table for a person at a terminal, JSON lines for a program."""
    if format_ != Format.AUTO:
        return format_
    return Format.TABLE if (stream or sys.stdout).isatty() else Format.JSON


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )


def status_name(value: int) -> str:
    return task_pb2.TaskStatus.Name(value).removeprefix("TASK_STATUS_")  # type: ignore[arg-type]


def change_name(value: int) -> str:
    return project_pb2.ChangeType.Name(value).removeprefix("CHANGE_TYPE_")  # type: ignore[arg-type]


_STATUS_STYLE = {
    "SUCCESS": "green",
    "FAILURE": "red",
    "REVOKED": "yellow",
    "RETRY": "yellow",
    "STARTED": "cyan",
    "PENDING": "dim",
}


def styled_status(value: int) -> str:
    name = status_name(value)
    style = _STATUS_STYLE.get(name, "")
    return f"[{style}]{name}[/]" if style else name


def summary(item: Task | Batch) -> str:
    """One line about a task or a batch, in rich markup."""
    if isinstance(item, Batch):
        totals = item.totals
        done = item.pages_succeeded + item.pages_failed + item.pages_cancelled
        line = (
            f"batch {item.id}  pages {item.first_page}-{item.last_page}  "
            f"{styled_status(item.status)}  {done}/{item.pages_total} pages done"
            f"  found {totals.found}  created {totals.created}  updated {totals.updated}"
        )
        if item.pages_failed or item.pages_cancelled:
            line += f"  failed {item.pages_failed}  cancelled {item.pages_cancelled}"
        if item.stop_page:
            line += f"  stopped at page {item.stop_page}"
    else:
        line = f"task {item.id}  page {item.page}  {styled_status(item.status)}"
        if item.status == task_pb2.TASK_STATUS_SUCCESS:
            result = item.result
            line += (
                f"  found {result.found}  created {result.created}  updated {result.updated}"
                f"  skipped {result.skipped}"
            )
    if item.error:
        line += f"  [red]{escape(item.error)}[/]"
    return line


def escape(text: str) -> str:
    return text.replace("[", r"\[")


TASK_COLUMNS = ("id", "page", "status", "found", "created", "updated", "error", "batch_id")
PROJECT_COLUMNS = ("id", "title", "is_active", "start_date", "update_time", "url")


def task_row(task: Task) -> list[str]:
    result = task.result
    finished = task.status == task_pb2.TASK_STATUS_SUCCESS
    return [
        task.id,
        str(task.page),
        status_name(task.status),
        str(result.found) if finished else "",
        str(result.created) if finished else "",
        str(result.updated) if finished else "",
        task.error,
        task.batch_id,
    ]


def project_row(project: Project) -> list[str]:
    start = project.start_date
    return [
        str(project.id),
        project.title,
        "yes" if project.is_active else "no",
        f"{start.year:04d}-{start.month:02d}-{start.day:02d}"
        if project.HasField("start_date")
        else "",
        project.update_time.ToJsonString() if project.HasField("update_time") else "",
        project.url,
    ]


def change_line(change: WatchedChange) -> str:
    kind = change_name(change.change_type)
    style = "green" if change.created else "cyan"
    active = "active" if change.project.is_active else "inactive"
    return (
        f"[{style}]{kind:<7}[/] #{change.project.id}  {escape(change.project.title)}  "
        f"({active})  [dim]{change.project.url}[/]"
    )


class Printer:
    """Writes what a command found in the format it was asked for."""

    def __init__(self, format_: Format) -> None:
        self.format = resolve(format_)
        # Colour and markup only for a person at a terminal; rich finds out which.
        self.console = Console(highlight=False, soft_wrap=True)
        self._csv: Any = None

    @property
    def for_people(self) -> bool:
        return self.format == Format.TABLE

    def json_line(self, document: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(document, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def item(self, item: Task | Batch) -> None:
        """A task or a batch: a line for people, its JSON for programs."""
        if self.for_people:
            self.console.print(summary(item))
        else:
            self.json_line({"batch" if isinstance(item, Batch) else "task": as_dict(item)})

    def rows(
        self,
        title: str,
        columns: Sequence[str],
        messages: Iterable[Message],
        row: Any,
        kind: str,
    ) -> int:
        """A table (people), CSV or JSON lines of `messages`; how many there were."""
        count = 0
        if self.format == Format.TABLE:
            table = Table(title=title, title_justify="left")
            for column in columns:
                # Ids stay whole, to be copied; long titles and links fold instead.
                whole = column == "id"
                table.add_column(column, overflow="fold", no_wrap=whole)
            for message in messages:
                table.add_row(*(escape(cell) for cell in row(message)))
                count += 1
            self.console.print(table)
        elif self.format == Format.CSV:
            writer = csv.writer(sys.stdout)
            writer.writerow(columns)
            for message in messages:
                writer.writerow(row(message))
                count += 1
            sys.stdout.flush()
        else:
            for message in messages:
                self.json_line({kind: as_dict(message)})
                count += 1
        return count

    def change(self, change: WatchedChange) -> None:
        if self.for_people:
            self.console.print(change_line(change))
        else:
            self.json_line(
                {
                    "change_type": project_pb2.ChangeType.Name(change.change_type),
                    "project": as_dict(change.project),
                    "cursor": change.cursor,
                }
            )
