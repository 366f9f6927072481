"""Shared machinery for the benchmarks: a stack on fresh embedded servers, latency stats, result tables.

Machines here are noisy, so a benchmark never reports a bare time as its verdict: it measures a baseline
in the same run (a bare endpoint, a raw loop) and reports the ratio next to the target.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pms import process
from pms.embedded import EmbeddedBroker, EmbeddedPostgres
from pms.registry import Probe, by_name
from pms.settings import KafkaSettings, PostgresSettings, Settings, to_env

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass
class Row:
    """One line of the results table."""

    bench: str
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    target: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.value / self.baseline  # type: ignore[operator]


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = f" ratio {row.ratio:.2f}" if row.ratio is not None else ""
        print(f"  {row.bench:<14} {row.metric:<42} {row.value:>12.2f} {row.unit}{ratio}", file=sys.stderr)

    def markdown(self) -> str:
        lines = ["| bench | metric | value | baseline | ratio | target |", "|---|---|---:|---:|---:|---|"]
        for row in self.rows:
            base = f"{row.baseline:.2f}" if row.baseline is not None else ""
            ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
            value = f"{row.value:.2f} {row.unit}"
            lines.append(f"| {row.bench} | {row.metric} | {value} | {base} | {ratio} | {row.target} |")
        return "\n".join(lines)

    def write(self) -> Path:
        RESULTS_DIR.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        (RESULTS_DIR / f"{stamp}.json").write_text(json.dumps([asdict(r) | {"ratio": r.ratio} for r in self.rows],
                                                              indent=2))
        path = RESULTS_DIR / f"{stamp}.md"
        path.write_text(self.markdown() + "\n")
        (RESULTS_DIR / "latest.md").write_text(self.markdown() + "\n")
        return path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class LoadResult:
    ops: int
    seconds: float
    latencies_ms: list[float]
    errors: int

    @property
    def qps(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def p95(self) -> float:
        return percentile(self.latencies_ms, 95)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)


def run_load(op: Callable[[int], bool], *, total: int, concurrency: int) -> LoadResult:
    """Run ``op(i)`` ``total`` times with ``concurrency`` in flight; ``op`` returns success."""
    latencies: list[float] = []
    errors = 0

    def one(i: int) -> None:
        nonlocal errors
        start = time.perf_counter()
        ok = op(i)
        latencies.append((time.perf_counter() - start) * 1000)
        if not ok:
            errors += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(total)))
    return LoadResult(total, time.perf_counter() - start, latencies, errors)


@contextmanager
def embedded_servers() -> Iterator[Settings]:
    """Fresh embedded PostgreSQL + broker in a temp dir, free ports for everything."""
    with tempfile.TemporaryDirectory(prefix="pms-bench-") as tmp:
        port = process.free_port
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            data_dir=Path(tmp),
            postgres=PostgresSettings(port=port()),
            kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port()}"),
            patient={"port": port(), "seed_demo_data": False},
            auth={"port": port()}, gateway={"port": port(), "rate_limit_per_minute": 10_000_000},
            analytics={"port": port()}, billing={"port": port()}, dashboard={"port": port()},
            pipeline={"port": port()},
        )
        postgres, broker = EmbeddedPostgres(settings), EmbeddedBroker(settings)
        postgres.start()
        broker.start()
        try:
            yield settings
        finally:
            broker.stop()
            postgres.stop()


@contextmanager
def services(settings: Settings, names: list[str]) -> Iterator[None]:
    """Start registry services as real processes (in order), stop them afterwards."""
    import os

    import httpx

    started = []
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PMS_")}, **to_env(settings)}
    try:
        for name in names:
            spec = by_name(name)
            proc = process.spawn([sys.executable, "-m", "pms.cli", "serve", name],
                                 log_path=settings.logs_dir / f"{name}.log", env=env)
            started.append(proc)
            url = f"http://{spec.host(settings)}:{spec.port(settings)}{spec.probe_path}"

            def ready(spec=spec, url=url) -> bool:
                if spec.probe is Probe.GRPC:
                    from tests.fixtures.services import grpc_serving

                    return grpc_serving(f"{spec.host(settings)}:{spec.port(settings)}")
                try:
                    return httpx.get(url, timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            process.wait_until(ready, timeout=90, interval=0.2, message=f"{name} ready",
                               alive=lambda proc=proc: proc.poll() is None)
        yield
    finally:
        for proc in reversed(started):
            process.stop(proc)
