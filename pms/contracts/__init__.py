"""Python stubs generated from ``proto/`` (never committed, never edited by hand).

Importing this package generates the stubs when they are missing or older than
their ``.proto`` source, so a fresh clone, an editable install and the test suite
all see current contracts without a separate step; ``make proto`` (or
``python -m pms.contracts``) does the same explicitly, and the Docker build runs it.
"""

from pms.contracts._build import ensure_generated

ensure_generated()
