"""Shared machinery for the benchmarks: a stack on fresh embedded servers, latency stats, result tables.

Machines here are noisy, so a benchmark never reports a bare time as its verdict: it measures a baseline
in the same run (a bare endpoint, a raw loop) and reports the ratio next to the target.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pms import probe, process
from pms.embedded import EmbeddedBroker, EmbeddedPostgres
from pms.registry import ServiceSpec, by_name, serve_command
from pms.settings import KafkaSettings, PostgresSettings, Settings, child_env

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


def merged(results: list[LoadResult]) -> LoadResult:
    """Rounds of one load as one: their operations over their summed time, every latency."""
    return LoadResult(sum(r.ops for r in results), sum(r.seconds for r in results),
                      [ms for r in results for ms in r.latencies_ms], sum(r.errors for r in results))


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


def post_load(url: str, bodies: Sequence[Any], *, headers: dict[str, str], concurrency: int,
              expect: int = 201, timeout_s: float = 60.0) -> LoadResult:
    """POST each of ``bodies`` once as JSON with ``concurrency`` in flight; success = status ``expect``
    within ``timeout_s``.

    One asyncio loop with aiohttp (C parser, keep-alive pool of ``concurrency`` connections), not
    :func:`run_load`'s threads with an httpx client each: the load generator shares the two cores
    with the servers it measures, and httpx in 16 threads cost 1.8-2.3 ms of CPU per request here
    against 0.35-0.47 ms for this loop. That much client CPU held the bare endpoint to the
    client's speed (~490/s, ~860/s with this loop) and so flattered every ratio against it.
    """
    import asyncio

    import aiohttp

    async def load() -> LoadResult:
        latencies: list[float] = []
        errors = 0
        pending = iter(bodies)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

            async def worker() -> None:
                nonlocal errors
                for body in pending:  # one shared iterator: each body is sent exactly once
                    start = time.perf_counter()
                    try:
                        async with session.post(url, json=body) as reply:
                            await reply.read()
                            ok = reply.status == expect
                    except (aiohttp.ClientError, TimeoutError):
                        ok = False
                    latencies.append((time.perf_counter() - start) * 1000)
                    errors += not ok

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return LoadResult(len(bodies), time.perf_counter() - start, latencies, errors)

    return asyncio.run(load())


def bench_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Embedded-mode settings on ``data_dir`` with a free port for every server and service."""
    port = process.free_port
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data_dir,
        postgres=PostgresSettings(port=port()),
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port()}"),
        patient={"port": port(), "seed_demo_data": False},
        auth={"port": port()}, gateway={"port": port(), "rate_limit_per_minute": 10_000_000},
        analytics={"port": port()}, billing={"port": port(), "metrics_port": port()}, dashboard={"port": port()},
        pipeline={"port": port()},
        **overrides,
    )


@contextmanager
def embedded_servers() -> Iterator[Settings]:
    """Fresh embedded PostgreSQL + broker in a temp dir, free ports for everything."""
    with tempfile.TemporaryDirectory(prefix="pms-bench-") as tmp:
        settings = bench_settings(Path(tmp))
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


def probe_ready(spec: ServiceSpec, settings: Settings) -> bool:
    """The registry's readiness probe of one service (HTTP /ready or gRPC health SERVING)."""
    return probe.ready(spec, host=spec.host(settings), port=spec.port(settings))


def profiled(argv: list[str], name: str) -> list[str]:
    """``argv`` under ``py-spy record`` (wall clock, per thread) into results/profile-<name>.txt.

    Enabled per service with ``PMS_BENCH_PROFILE=patient,pipeline``; summarise the collapsed
    stacks with ``python -m bench.profile results/profile-<name>.txt``.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"profile-{name}.txt"
    rate = os.environ.get("PMS_BENCH_PROFILE_RATE", "50")
    # Wall clock by default (where do requests wait?); PMS_BENCH_PROFILE_IDLE=0 keeps on-CPU samples only.
    idle = ["--idle"] if os.environ.get("PMS_BENCH_PROFILE_IDLE", "1") != "0" else []
    return [spy, "record", *idle, "--threads", "--rate", rate, "--format", "raw", "-o", str(out), "--", *argv]


@contextmanager
def services(settings: Settings, names: list[str]) -> Iterator[None]:
    """Start registry services as real processes (in order), stop them afterwards."""
    started = []
    profiling: set[int] = set()
    env = child_env(settings)
    try:
        for name in names:
            spec = by_name(name)
            argv = serve_command(by_name(name))
            if name in os.environ.get("PMS_BENCH_PROFILE", "").split(","):
                argv = profiled(argv, name)
                profiling.add(len(started))
            proc = process.spawn(argv, log_path=settings.logs_dir / f"{name}.log", env=env)
            started.append(proc)
            # A service started under py-spy imports far more slowly: give it longer.
            process.wait_until(lambda spec=spec: probe_ready(spec, settings), timeout=300 if profiling else 90,
                               interval=0.2,
                               message=f"{name} ready", alive=lambda proc=proc: proc.poll() is None)
        yield
    finally:
        for index in reversed(range(len(started))):
            # py-spy writes its profile on SIGINT, which the service also takes as a clean stop.
            process.stop(started[index], sig=signal.SIGINT if index in profiling else signal.SIGTERM, timeout=30)


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


def paced(op: Callable[[int], Any], *, rate: float, total: int, workers: int = 8) -> float:
    """Start ``op(i)`` at ``rate`` per second (i-th call due at start + i/rate); return the seconds taken.

    The pacing waits on an Event with a deadline -- it sets the offered load, it does not
    synchronise with anything.
    """
    import threading

    pause = threading.Event()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = []
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                pause.wait(delay)
            futures.append(pool.submit(op, i))
        for future in futures:
            future.result()
    return time.perf_counter() - start


def raw_produce_consume_latency(settings: Settings, *, topic: str, rate: float, total: int) -> list[float]:
    """Milliseconds from ``produce()`` to a consumer's ``poll()`` over the embedded broker at ``rate``/s.

    The floor any relay or pipeline on this broker can reach: a producer configured like the
    outbox relay's, a consumer assigned to the partition (no group), nothing else.
    """
    import struct
    import threading

    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    from api.patient.relay import producer_config

    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers, "log_level": 3})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=10)
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"bench-{topic}",
                         "enable.auto.commit": False, "log_level": 3, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, 0, 0)])
    producer = Producer(producer_config(settings))
    latencies: list[float] = []
    done = threading.Event()

    def consume() -> None:
        while len(latencies) < total + 1 and not done.is_set():
            message = consumer.poll(0.1)
            if message is None or message.error():
                continue
            (sent,) = struct.unpack("!d", message.value())
            latencies.append((time.time() - sent) * 1000)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        def send(_i: int) -> None:
            producer.produce(topic, value=struct.pack("!d", time.time()))
            producer.poll(0)

        # Warm-up: the first message pays for connections and the first fetch; keep it out.
        send(-1)
        producer.flush(10)
        process.wait_until(lambda: len(latencies) >= 1, timeout=30, interval=0.05, message="first raw message")

        paced(send, rate=rate, total=total, workers=1)
        producer.flush(10)
        process.wait_until(lambda: len(latencies) >= total + 1, timeout=30, interval=0.05,
                           message="raw consumer to read every message")
    finally:
        done.set()
        reader.join(5)
        consumer.close()
    return latencies[1:]


def _cpu_processes(names: tuple[str, ...]) -> dict[str, list[psutil.Process]]:
    """Our services ``names``, the bare app and the PostgreSQL processes (postmaster + backends) we started."""
    found: dict[str, list[psutil.Process]] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            name = child.name()
        except psutil.Error:
            continue
        if "py-spy" in cmd:
            continue
        key = next((svc for svc in names if f"serve {svc}" in cmd), None)
        if key is None and "bench.bare_app" in cmd:
            key = "bare app"
        if key is None and name == "postgres":
            key = "postgres"
        if key is not None:
            found.setdefault(key, []).append(child)
    return found


def cpu_seconds(names: tuple[str, ...]) -> dict[int, tuple[str, float]]:
    """User + system CPU seconds of each process of :func:`_cpu_processes`, by pid (take one before, one after)."""
    seconds: dict[int, tuple[str, float]] = {}
    for key, group in _cpu_processes(names).items():
        for proc in group:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            seconds[proc.pid] = (key, times.user + times.system)
    return seconds


def cpu_per_request(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                     total: int) -> dict[str, float]:
    """CPU ms per request by group; a process started during the load (a new PostgreSQL
    backend) counts in full, one that exited during it is lost (none do in this bench)."""
    spent: dict[str, float] = {}
    for pid, (key, secs) in after.items():
        spent[key] = spent.get(key, 0.0) + secs - before.get(pid, (key, 0.0))[1]
    return {key: value * 1000 / total for key, value in spent.items()}
