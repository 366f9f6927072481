"""``python -m bench [NAME ...] [--big] [--patients N]``: run benchmarks on fresh embedded servers.

Each benchmark gets its own embedded PostgreSQL + broker; the table (ratios against baselines
measured in the same run) goes to stdout, bench/results/<time>.md|json and bench/results/latest.md.
``PMS_BENCH_PROFILE=patient,...`` runs those services under py-spy (see bench/harness.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bench.harness import OPTIONS, Report, embedded_servers

BENCHES = ("billing", "write_path", "read_path", "relay", "pipeline", "catchup", "footprint")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all): {BENCHES}")
    parser.add_argument("--big", action="store_true",
                        help="read_path: also measure at 1,000,000 patients (or PMS_BENCH_BIG=1)")
    parser.add_argument("--patients", type=int, default=None, metavar="N",
                        help="catchup: patients to catch up after a broker restart (issue 5 asks 1,000,000)")
    args = parser.parse_args(argv)
    OPTIONS.update(big=args.big, patients=args.patients)
    unknown = set(args.names) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {BENCHES}")
    report = Report()
    for name in args.names or BENCHES:
        print(f"== {name}", file=sys.stderr)
        module = importlib.import_module(f"bench.{name}")
        with embedded_servers() as settings:
            module.run(settings, report)
    path = report.write()
    print(report.markdown())
    print(f"\nwritten to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
