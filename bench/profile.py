"""Summarise a py-spy collapsed-stack profile: where did the (wall clock) samples go?

``python -m bench.profile FILE [--only SUBSTR] [--by SUBSTR] [--top N]``

- ``--only``: keep stacks that contain SUBSTR (e.g. ``relay.py`` for the outbox relay thread).
- ``--by``: attribute each sample to the deepest frame whose text contains SUBSTR (e.g.
  ``api/patient`` for "which of our functions"), plus that frame's direct callee, so a wait in
  librdkafka or psycopg shows up under the line of ours that waits.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def summarise(path: Path, *, only: str | None, by: str | None, top: int) -> str:
    counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit() or (only and only not in stack):
            continue
        frames = stack.split(";")
        key = frames[-1]
        if by:
            ours = [i for i, frame in enumerate(frames) if by in frame]
            if ours:
                i = ours[-1]
                key = frames[i] + (f"  ->  {frames[i + 1]}" if i + 1 < len(frames) else "")
        counts[key] += int(count)
        total += int(count)
    lines = [f"{total} samples" + (f" in stacks containing {only!r}" if only else "")]
    for key, count in counts.most_common(top):
        lines.append(f"{100 * count / max(total, 1):5.1f}%  {key}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("--only")
    parser.add_argument("--by")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print(summarise(args.file, only=args.only, by=args.by, top=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
