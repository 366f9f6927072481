"""README.md is generated from docs/readme/*.md (tests/tools/readme.py) and must not drift from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tools import readme


def test_readme_is_assembled_from_its_sections() -> None:
    assert readme.main(["--check"]) == 0, "README.md is out of date: run `make readme` and commit the result"


def test_every_section_file_is_listed_and_appears_once() -> None:
    files = {path.stem for path in (readme.ROOT / "docs" / "readme").glob("*.md")}
    assert files == set(readme.SECTIONS)
    assert len(readme.SECTIONS) == len(set(readme.SECTIONS))


def _fake_repo(root: Path, section: str) -> None:
    (root / "docs" / "readme").mkdir(parents=True)
    for name in readme.SECTIONS:
        text = f"## {name.title()}\n\nabout {name}\n"
        if name == "config":
            text += "<!-- config-table:start -->\nstale\n<!-- config-table:end -->\n"
        (root / "docs" / "readme" / f"{name}.md").write_text(text)
    (root / "docs" / "readme" / f"{section}.md").write_text("## Billing (`gRPC`)\n\n![x](../screenshots/a.png)\n")
    (root / "README.md").write_text("# Title\n\nintro\n<!-- sections -->\nold body\n")


def test_assembly_orders_sections_builds_contents_and_fixes_links(tmp_path: Path) -> None:
    _fake_repo(tmp_path, "billing")
    document = readme.assemble(tmp_path)
    assert document.startswith("# Title\n\nintro\n\n<!-- sections -->\n\n## Contents\n")
    assert "old body" not in document
    assert "- [Billing (`gRPC`)](#billing-grpc)" in document
    assert "](docs/screenshots/a.png)" in document
    assert document.index("## Foundation") < document.index("## Config") < document.index("## Billing")
    assert "stale" not in document and "PMS_KAFKA__TOPIC" in document


def test_a_readme_without_the_marker_is_refused(tmp_path: Path) -> None:
    _fake_repo(tmp_path, "billing")
    (tmp_path / "README.md").write_text("# Title only\n")
    with pytest.raises(ValueError, match="sections"):
        readme.assemble(tmp_path)
