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
from typing import Any

from pms import process
from pms.embedded import EmbeddedBroker, EmbeddedPostgres
from pms.registry import Probe, by_name
from pms.settings import KafkaSettings, PostgresSettings, Settings, to_env

RESULTS_DIR = Path(__file__).parent / "results"

#: Run-wide options set by ``python -m bench`` (``--big``, ``--patients N``); benches read them.
OPTIONS: dict[str, Any] = {"big": False, "patients": None}
#: The embedded servers of the current ``embedded_servers()`` block, for benches that restart one.
CURRENT: dict[str, Any] = {}


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
    #: Free-form sections (EXPLAIN plans, profiles) appended below the table.
    sections: list[tuple[str, str]] = field(default_factory=list)

    def section(self, title: str, body: str) -> None:
        """Keep ``body`` (preformatted text) for the written results and echo it to stderr."""
        self.sections.append((title, body))
        print(f"--- {title}\n{body}", file=sys.stderr)

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
        text = self.markdown() + "\n" + "".join(f"\n#### {title}\n\n```\n{body}\n```\n"
                                                 for title, body in self.sections)
        path.write_text(text)
        (RESULTS_DIR / "latest.md").write_text(text)
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
        CURRENT.update(postgres=postgres, broker=broker)
        try:
            yield settings
        finally:
            CURRENT.clear()
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


def pg_connect(settings: Settings, database: str) -> Any:
    """An autocommit psycopg connection to one service database (as the application role)."""
    import psycopg

    from pms.embedded import libpq_dsn

    return psycopg.connect(libpq_dsn(settings.database_url_for(database)), autocommit=True)


def pipeline_processed(settings: Settings) -> int:
    """``pipeline_status.events_processed`` (0 before the pipeline made its table or row)."""
    import psycopg

    try:
        with pg_connect(settings, "analytics") as conn:
            row = conn.execute("SELECT events_processed FROM pipeline_status WHERE id = 1").fetchone()
    except psycopg.Error:
        return 0
    return int(row[0]) if row else 0


def http_load(url: str, *, headers: dict[str, str], total: int, concurrency: int = 1,
              params: dict[str, Any] | None = None) -> LoadResult:
    """GET ``url`` ``total`` times (after 5 warm-up calls); success = 200."""
    import httpx

    with httpx.Client(timeout=60, headers=headers) as client:
        for _ in range(5):
            client.get(url, params=params)
        return run_load(lambda _i: client.get(url, params=params).status_code == 200, total=total,
                        concurrency=concurrency)


def timed(fn: Callable[[], Any], *, repeat: int, warmup: int = 2) -> list[float]:
    """Milliseconds of ``repeat`` calls of ``fn`` after ``warmup`` unmeasured calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times
