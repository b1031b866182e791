"""The README's settings table is the one `core.settings_doc` renders from `Settings`.

So its names, defaults and descriptions all follow the code: a field added, renamed, given
another default or described anew fails here until the table is regenerated.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from core import settings_doc
from core.settings import Settings, SourceProfile
from tests.unit.helpers import clear_settings_environment

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REGENERATE = (
    "the README's settings table differs from core/settings.py: run "
    "`python -m core.settings_doc --write README.md` (or `python -m core.settings_doc` and paste "
    "its output between the settings markers)"
)


def readme_table() -> str:
    table = settings_doc.block(README.read_text())
    assert table is not None, (
        f"README.md needs exactly one {settings_doc.BEGIN_MARKER!r} line and one "
        f"{settings_doc.END_MARKER!r} marker around the settings table"
    )
    return table


def documented_settings() -> set[str]:
    return set(re.findall(r"^\| `([A-Z_]+)` \|", readme_table(), flags=re.MULTILINE))


def test_the_readme_settings_table_is_the_generated_one() -> None:
    assert readme_table() == settings_doc.settings_table(), REGENERATE


def test_every_setting_is_in_the_readme_table() -> None:
    expected = {name.upper() for name in Settings.model_fields}
    expected |= {f"SOURCE_PROFILE__{name.upper()}" for name in SourceProfile.model_fields}
    documented = documented_settings()
    assert expected - documented == set(), "settings missing from the README table"
    assert documented - expected == set(), "README documents settings that do not exist"


@pytest.mark.parametrize(
    ("model", "name"),
    [(Settings, name) for name in Settings.model_fields]
    + [(SourceProfile, name) for name in SourceProfile.model_fields],
)
def test_every_setting_has_a_description(model: type[BaseModel], name: str) -> None:
    description = model.model_fields[name].description
    assert description, f"{model.__name__}.{name} needs Field(..., description=...)"
    assert description.strip().endswith((".", ")")), f"{name}: a full sentence, please"


def test_a_field_without_a_description_is_refused() -> None:
    class Undocumented(BaseModel):
        documented: int = Field(default=1, description="Has one.")
        bare: int = 2

    assert settings_doc.undocumented(Undocumented) == ["BARE"]
    with pytest.raises(ValueError, match="BARE has no description"):
        settings_doc.settings_table(Undocumented)


def test_defaults_are_rendered_as_a_user_would_type_them() -> None:
    class Kinds(BaseModel):
        none: str | None = Field(default=None, description="x.")
        empty: str = Field(default="", description="x.")
        empty_list: list[str] = Field(default_factory=list, description="x.")
        path: Path = Field(default=Path("data"), description="x.")
        whole: float = Field(default=5.0, description="x.")
        fraction: float = Field(default=0.25, description="x.")
        flag: bool = Field(default=False, description="x.")
        nested: SourceProfile = Field(default_factory=SourceProfile, description="x.")

    defaults = {variable: default for variable, default, _ in settings_doc.rows(Kinds)}

    assert defaults["NONE"] == defaults["EMPTY"] == defaults["EMPTY_LIST"] == settings_doc.UNSET
    assert (defaults["PATH"], defaults["WHOLE"], defaults["FRACTION"], defaults["FLAG"]) == (
        "`data`",
        "`5`",
        "`0.25`",
        "`false`",
    )
    assert defaults["NESTED"] == settings_doc.NESTED_DEFAULT
    assert defaults["NESTED__ITEM"] == "`.project`"


def test_every_default_in_the_table_reads_back_as_the_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Typing every default as the table shows it gives the same Settings as setting nothing."""
    clear_settings_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)  # and no .env the process might find
    nothing_set = Settings(_env_file=None)
    for variable, default, _ in settings_doc.rows():
        if default.startswith("`"):
            monkeypatch.setenv(variable, default.strip("`"))

    assert Settings(_env_file=None) == nothing_set


def test_write_puts_the_table_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# title\n\n{settings_doc.BEGIN_MARKER}\n| stale |\n{settings_doc.END_MARKER}\n\nafter\n"
    )

    assert settings_doc.main(["--write", str(readme)]) == 0

    text = readme.read_text()
    assert settings_doc.block(text) == settings_doc.settings_table()
    assert text.startswith("# title\n\n") and text.endswith(f"{settings_doc.END_MARKER}\n\nafter\n")
