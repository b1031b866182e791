"""Helpers for the unit tests."""

from __future__ import annotations

import os

import pytest

from core.settings import Settings


def clear_settings_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every variable Settings would read (a developer's shell may export some)."""
    fields = tuple(Settings.model_fields)
    for name in list(os.environ):
        lowered = name.lower()
        if lowered in fields or lowered.startswith(tuple(f"{field}__" for field in fields)):
            monkeypatch.delenv(name)
