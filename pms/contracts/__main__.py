"""``python -m pms.contracts``: regenerate the stubs from ``proto/``."""

from pms.contracts._build import PACKAGE_DIR, PROTOS, generate

generate()
print(f"generated stubs for {', '.join(PROTOS)} into {PACKAGE_DIR}")
