"""Fail when a notebook under notebooks/ is stored with outputs or execution counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def dirty_notebooks(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.glob("**/*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        for index, cell in enumerate(json.loads(path.read_text())["cells"]):
            if cell.get("cell_type") == "code" and (cell.get("outputs") or cell.get("execution_count")):
                problems.append(f"{path}: cell {index} has outputs; clear them before committing")
    return problems


if __name__ == "__main__":
    found = dirty_notebooks(Path("notebooks"))
    print("\n".join(found) or "notebooks are clean")
    sys.exit(1 if found else 0)
