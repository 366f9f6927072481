"""Assemble README.md from its parts: ``python -m tests.tools.readme --write | --check``.

README.md is long and several people change it at once, so each part of the system keeps its
section in ``docs/readme/<part>.md`` and README.md is generated: the hand-written head of README.md
(everything before the ``<!-- sections -->`` marker), a table of contents, the sections in
``SECTIONS`` order, then ``docs/development.md``. The configuration table inside the config
section is regenerated from ``pms.settings`` on the way, so it cannot drift either.
``--check`` exits 1 when README.md differs from what would be written (a test runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pms import config_doc

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- sections -->"
#: Section files under docs/readme, in README order.
SECTIONS = ("foundation", "config", "patient", "billing", "auth-gateway", "analytics", "dashboard", "notebooks",
            "deploy", "backup", "faults", "performance")


def _section(name: str, root: Path) -> str:
    text = (root / "docs" / "readme" / f"{name}.md").read_text().strip() + "\n"
    # Links written relative to docs/readme/ become relative to the repository root.
    return text.replace("](../screenshots/", "](docs/screenshots/").replace("](../../", "](")


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 -]", "", title.lower().replace("`", "")).replace(" ", "-")


def assemble(root: Path = ROOT) -> str:
    """The README.md that the parts under ``root`` make."""
    readme = (root / "README.md").read_text()
    if MARKER not in readme:
        raise ValueError(f"README.md has no {MARKER} marker after its head")
    head = readme.split(MARKER)[0].rstrip() + "\n"
    parts = [_section(name, root) for name in SECTIONS]
    development = root / "docs" / "development.md"
    if development.exists():
        parts.append(development.read_text().strip() + "\n")
    toc = ["## Contents", ""]
    for text in parts:
        title = re.match(r"## (.+)", text)
        if title:
            toc.append(f"- [{title.group(1).strip()}]({'#' + _anchor(title.group(1).strip())})")
    body = "\n".join(parts)
    document = head + f"\n{MARKER}\n\n" + "\n".join(toc) + "\n\n" + body
    return config_doc.replace_table(document, config_doc.markdown_table())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite README.md (and the config section's table)")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md is out of date")
    args = parser.parse_args(argv)
    wanted = assemble()
    readme = ROOT / "README.md"
    if args.check:
        if readme.read_text() != wanted:
            print("README.md is out of date: run `make readme` and commit the result", file=sys.stderr)
            return 1
        return 0
    config = ROOT / "docs" / "readme" / "config.md"
    config.write_text(config_doc.replace_table(config.read_text(), config_doc.markdown_table()))
    readme.write_text(wanted)
    print(f"README.md: {len(wanted.splitlines())} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
