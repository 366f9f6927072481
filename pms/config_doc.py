"""The README's configuration table, generated from :class:`pms.settings.Settings`.

Every ``PMS_*`` variable with its default and description, so the README can never
describe settings that do not exist (``tests/test_readme_config.py`` fails on drift).
A field's description is its ``Field(description=...)`` or else the ``#:`` comment above
it in ``pms/settings.py``; ``host`` and ``port`` of a section without one describe
themselves.

    python -m pms.config_doc                     # print the table
    python -m pms.config_doc --write README.md   # replace the table between the markers
    python -m pms.config_doc --check README.md   # exit 1 when the file's table drifted
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pms.settings import Settings

START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"
_FIELD_LINE = re.compile(r"^(\s+)([A-Za-z_]\w*)\s*:")


@dataclass(frozen=True, slots=True)
class Row:
    variable: str
    default: str
    description: str


def rows(settings_cls: type[BaseModel] = Settings) -> list[Row]:
    """One row per ``PMS_*`` variable, in the order the fields are declared."""
    out: list[Row] = []
    for name, info in settings_cls.model_fields.items():
        default = _default(info)
        if isinstance(default, BaseModel):
            section = type(default)
            for sub_name, sub_info in section.model_fields.items():
                out.append(Row(
                    variable=f"PMS_{name.upper()}__{sub_name.upper()}",
                    default=_format(_default(sub_info)),
                    description=_description(section, sub_name, sub_info, section_name=name),
                ))
        else:
            out.append(Row(
                variable=f"PMS_{(info.alias or name).upper()}",
                default=_format(default),
                description=_description(settings_cls, name, info),
            ))
    return out


def markdown_table(settings_cls: type[BaseModel] = Settings) -> str:
    """The table as GitHub markdown (no trailing newline)."""
    lines = ["| Variable | Default | Description |", "|---|---|---|"]
    for row in rows(settings_cls):
        default = f"`{_cell(row.default)}`" if row.default else "*(unset)*"
        lines.append(f"| `{row.variable}` | {default} | {_cell(row.description)} |")
    return "\n".join(lines)


def replace_table(document: str, table: str) -> str:
    """``document`` with the text between the markers replaced by ``table``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    start, end = document.find(START), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {START} ... {END} markers found")
    return document[: start + len(START)] + "\n" + table + "\n" + document[end:]


def table_in(document: str) -> str | None:
    """The text between the markers, stripped, or None when there are no markers."""
    start, end = document.find(START), document.find(END)
    if start < 0 or end < start:
        return None
    return document[start + len(START): end].strip()


# -- defaults and descriptions -----------------------------------------------------------------


def _default(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return None if info.default is PydanticUndefined else info.default


def _format(value: Any) -> str:
    if value is None or isinstance(value, SecretStr):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _description(cls: type[BaseModel], name: str, info: FieldInfo, *, section_name: str | None = None) -> str:
    if info.description:
        return info.description
    for klass in cls.__mro__:
        comment = _comments(klass).get(name)
        if comment:
            return comment
    if section_name and name == "host":
        return f"Address the {section_name} server listens on."
    if section_name and name == "port":
        return f"Port the {section_name} server listens on."
    return ""


@cache
def _comments(klass: type) -> dict[str, str]:
    """Field name -> the ``#:`` comment block right above it (Sphinx's convention)."""
    try:
        lines = inspect.getsource(klass).splitlines()[1:]
    except (OSError, TypeError):
        return {}
    body = next((line for line in lines if line.strip()), "")
    indent = body[: len(body) - len(body.lstrip())]
    found: dict[str, str] = {}
    block: list[str] = []
    for line in lines:
        stripped = line.strip()
        match = _FIELD_LINE.match(line)
        if stripped.startswith("#:") and line.startswith(indent + "#:"):
            block.append(stripped[2:].strip())
        elif match and match.group(1) == indent:
            if block:
                found[match.group(2)] = " ".join(block)
            block = []
        else:  # a blank line, a method, a plain comment: the block ends here
            block = []
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="FILE", help="replace the table between the markers")
    group.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if the file's table is out of date")
    args = parser.parse_args(argv)
    table = markdown_table()
    if args.write:
        args.write.write_text(replace_table(args.write.read_text(), table))
        return 0
    if args.check:
        if table_in(args.check.read_text()) != table:
            sys.stderr.write(f"{args.check}: configuration table is out of date; "
                             f"run python -m pms.config_doc --write {args.check}\n")
            return 1
        return 0
    sys.stdout.write(f"{START}\n{table}\n{END}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
