"""The README's configuration table is generated from the Settings class and must not drift."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from pms import config_doc
from pms.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
FIX = "run `python -m pms.config_doc --write {path}` and commit the result"


def _leaf_variables() -> set[str]:
    names = set()
    for name, info in Settings.model_fields.items():
        if isinstance(info.default, BaseModel):
            names |= {f"PMS_{name.upper()}__{sub.upper()}" for sub in type(info.default).model_fields}
        else:
            names.add(f"PMS_{name.upper()}")
    return names


def test_table_lists_every_variable_once_with_a_description() -> None:
    rows = config_doc.rows()
    variables = [row.variable for row in rows]
    assert len(variables) == len(set(variables))
    assert set(variables) == _leaf_variables()
    undocumented = [row.variable for row in rows if not row.description]
    assert not undocumented, f"add a `#:` comment above these fields in pms/settings.py: {undocumented}"


def test_table_shows_real_defaults_and_hides_secrets() -> None:
    by_name = {row.variable: row for row in config_doc.rows()}
    assert by_name["PMS_PATIENT__PORT"].default == "4000"
    assert by_name["PMS_GATEWAY__PORT"].default == "4004"
    assert by_name["PMS_KAFKA__TOPIC"].default == "patient"
    assert by_name["PMS_PATIENT__SEED_DEMO_DATA"].default == "true"
    assert by_name["PMS_JWT__SECRET"].default == ""
    assert by_name["PMS_DATABASE_URL"].default == ""
    assert "HMAC" in by_name["PMS_JWT__SECRET"].description
    assert "| `PMS_JWT__SECRET` | *(unset)* |" in config_doc.markdown_table()


def test_replace_table_keeps_the_rest_of_the_document() -> None:
    document = f"# Title\n\nbefore\n{config_doc.START}\nold\n{config_doc.END}\nafter\n"
    updated = config_doc.replace_table(document, "| new |")
    assert updated == f"# Title\n\nbefore\n{config_doc.START}\n| new |\n{config_doc.END}\nafter\n"
    assert config_doc.table_in(updated) == "| new |"
    with pytest.raises(ValueError, match="markers"):
        config_doc.replace_table("no markers here", "| new |")


def test_check_command_detects_drift(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{config_doc.START}\n| stale |\n{config_doc.END}\n")
    assert config_doc.main(["--check", str(readme)]) == 1
    assert config_doc.main(["--write", str(readme)]) == 0
    assert config_doc.main(["--check", str(readme)]) == 0
    assert readme.read_text().startswith("x\n")


@pytest.mark.parametrize("relative", ["docs/readme/config.md", "README.md"])
def test_documented_table_matches_the_settings(relative: str) -> None:
    path = ROOT / relative
    if not path.exists():
        pytest.fail(f"{relative} is missing")
    table = config_doc.table_in(path.read_text())
    assert table is not None, (f"{relative} has no {config_doc.START} ... {config_doc.END} section; "
                               + FIX.format(path=relative))
    assert table == config_doc.markdown_table(), f"{relative} is out of date: " + FIX.format(path=relative)
