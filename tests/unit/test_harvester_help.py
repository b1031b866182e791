"""`harvester --help` and every subcommand's help say what it does, with an example; the
settings they read from the environment are listed."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from harvester.cli import root
from harvester.connection import (
    ENV_ADDRESS,
    ENV_DEADLINE,
    ENV_TLS_CA_FILE,
    ENV_TLS_CERT_FILE,
    ENV_TLS_KEY_FILE,
    ENV_TOKEN,
)


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for name, command in group.commands.items():
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += commands(command, (*prefix, name))
    return found


def test_the_top_help_lists_every_environment_variable_and_the_exit_codes() -> None:
    shown = CliRunner().invoke(root, ["--help"], terminal_width=200)
    assert shown.exit_code == 0
    for variable in (
        ENV_ADDRESS, ENV_TOKEN, ENV_TLS_CA_FILE, ENV_TLS_CERT_FILE, ENV_TLS_KEY_FILE, ENV_DEADLINE
    ):  # fmt: skip
        assert variable in shown.output
    assert "Examples:" in shown.output and "harvester upload 1-20 --wait" in shown.output
    assert "Exit codes: 0 done" in shown.output


@pytest.mark.parametrize("path", commands(root))
def test_each_command_says_what_it_does_with_an_example(path: tuple[str, ...]) -> None:
    shown = CliRunner().invoke(root, [*path, "--help"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "Example" in shown.output
    assert f"harvester {' '.join(path)}" in shown.output


def test_the_commands_are_the_issues() -> None:
    assert set(commands(root)) == {
        ("upload",), ("status",), ("cancel",), ("tasks",), ("projects",),
        ("projects", "watch"), ("health",),
    }  # fmt: skip


def test_a_page_range_is_checked_before_any_call() -> None:
    result = CliRunner().invoke(root, ["--address", "127.0.0.1:1", "upload", "5-2"])
    assert result.exit_code == 2 and "the last page comes before the first" in result.output
