"""The README's settings table names every setting there is, and no other."""

from __future__ import annotations

import re
from pathlib import Path

from core.settings import Settings, SourceProfile

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_settings() -> set[str]:
    return set(re.findall(r"^\| `([A-Z_]+)` \|", README.read_text(), flags=re.MULTILINE))


def test_every_setting_is_in_the_readme_table() -> None:
    expected = {name.upper() for name in Settings.model_fields if name != "source_profile"}
    expected |= {f"SOURCE_PROFILE__{name.upper()}" for name in SourceProfile.model_fields}
    documented = documented_settings()
    assert expected - documented == set(), "settings missing from the README table"
    assert documented - expected == set(), "README documents settings that do not exist"
