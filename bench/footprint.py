"""Footprint: memory of the whole embedded stack idle and under load, and ``pms up`` time to ready.

The real supervisor (``python -m pms.cli up``) runs with ``PMS_*`` variables pointing at a
fresh temporary data dir and free ports, so it initialises PostgreSQL, starts Tansu and every
registered service exactly as a user's first ``pms up`` does. Time to ready = spawn -> every
service answers its registry readiness probe. It is stopped with SIGINT, as Ctrl-C does.

Memory is summed over the supervisor's whole process tree (PostgreSQL and its backends, Tansu,
every service). PSS (proportional set size) is the honest sum -- PostgreSQL backends share
their buffers, which plain RSS counts once per backend -- RSS is shown next to it.

Baselines, same run: the embedded PostgreSQL + Tansu alone (started cold in their own fresh dir
for the time; their memory while idle), and, for the loaded figure, the idle stack.
"""

from __future__ import annotations

import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from bench.harness import CURRENT, Report, Row, bench_settings, probe_ready, run_load
from pms import process
from pms.embedded import EmbeddedBroker, EmbeddedPostgres
from pms.registry import SERVICES
from pms.settings import Settings, child_env

ADMIN_PASSWORD = "bench-Admin-password-7431"
LOAD_CREATES = 400


def tree_memory(pids: list[int]) -> tuple[float, float, int]:
    """PSS and RSS (MiB) summed over ``pids`` and all their descendants, and the process count."""
    seen: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                seen[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    pss = rss = 0
    for proc in seen.values():
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += info.pss
        rss += info.rss
    return pss / 2**20, rss / 2**20, len(seen)


def _sample(pids: list[int], *, count: int = 5) -> tuple[float, float, int]:
    """Median of a few samples 0.2 s apart (memory moves while background threads tick)."""
    samples = []
    pause = threading.Event()
    for _ in range(count):
        samples.append(tree_memory(pids))
        pause.wait(0.2)
    return (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples),
            max(s[2] for s in samples))


def run(settings: Settings, report: Report) -> None:
    servers_pss, servers_rss, _ = _sample([CURRENT["postgres"].proc.pid, CURRENT["broker"].proc.pid])
    servers_cold = _cold_servers()
    with tempfile.TemporaryDirectory(prefix="pms-bench-up-") as tmp:
        stack = bench_settings(Path(tmp), admin_password=ADMIN_PASSWORD)
        env = child_env(stack)
        start = time.perf_counter()
        up = process.spawn([sys.executable, "-m", "pms.cli", "up"], log_path=Path(tmp) / "up.log", env=env)
        try:
            try:
                process.wait_until(lambda: all(probe_ready(spec, stack) for spec in SERVICES), timeout=240,
                                   interval=0.1, message="pms up: every service ready",
                                   alive=lambda: up.poll() is None)
            except (RuntimeError, TimeoutError):
                tail = (Path(tmp) / "up.log").read_text(errors="replace").splitlines()[-30:]
                print("\n".join(["pms up output (last lines):", *tail]), file=sys.stderr)
                raise
            up_time = time.perf_counter() - start
            idle_pss, idle_rss, procs = _sample([up.pid])
            load_pss, load_rss, served = _under_load(stack, up.pid)
        finally:
            start = time.perf_counter()
            code = process.stop(up, sig=signal.SIGINT, timeout=60)  # as Ctrl-C
            stop_time = time.perf_counter() - start
    report.add(Row("footprint", "pms up: cold start to all ready", up_time, "s", baseline=servers_cold,
                   note=f"{len(SERVICES)} services; baseline: embedded PostgreSQL (initdb) + Tansu alone, cold"))
    report.add(Row("footprint", f"stack memory idle (PSS, {procs} processes)", idle_pss, "MiB",
                   baseline=servers_pss, note=f"RSS {idle_rss:.0f} MiB; baseline: PostgreSQL + Tansu alone "
                                             f"(PSS; RSS {servers_rss:.0f} MiB)"))
    report.add(Row("footprint", "stack memory under load (PSS, peak)", load_pss, "MiB", baseline=idle_pss,
                   note=f"RSS {load_rss:.0f} MiB; {served}; baseline: the idle stack"))
    report.add(Row("footprint", "pms up: Ctrl-C to exit", stop_time, "s", note=f"exit code {code}"))


def _cold_servers() -> float:
    """Seconds to initialise and start a fresh embedded PostgreSQL and Tansu (then stop them)."""
    with tempfile.TemporaryDirectory(prefix="pms-bench-cold-") as tmp:
        servers = bench_settings(Path(tmp))
        postgres, broker = EmbeddedPostgres(servers), EmbeddedBroker(servers)
        start = time.perf_counter()
        postgres.start()
        broker.start()
        seconds = time.perf_counter() - start
        broker.stop()
        postgres.stop()
    return seconds


def _under_load(stack: Settings, pid: int) -> tuple[float, float, str]:
    """Peak memory while creates (16 in flight) and searches go through the gateway."""
    base = stack.gateway.base_url
    login = httpx.post(base + "/auth/login", json={"email": stack.admin_email, "password": ADMIN_PASSWORD},
                       timeout=30)
    login.raise_for_status()
    headers = {"Authorization": f"Bearer {login.json()['token']}"}
    peak = [0.0, 0.0]
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            pss, rss, _ = tree_memory([pid])
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            stop.wait(0.25)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    local = threading.local()

    def op(i: int) -> bool:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=30, headers=headers)
        if i % 4 == 3:
            return local.client.get(base + "/api/patients", params={"q": "Load"}).status_code == 200
        return local.client.post(base + "/api/patients", json={
            "name": f"Load Patient {i}", "email": f"load.{i}@example.org", "address": f"{i} Load Lane",
            "dateOfBirth": "1990-05-05", "registeredDate": "2024-01-01"}).status_code == 201

    try:
        result = run_load(op, total=LOAD_CREATES, concurrency=16)
    finally:
        stop.set()
        thread.join(5)
    return peak[0], peak[1], f"{result.ops} requests (3/4 creates, 1/4 searches) at {result.qps:.0f}/s, " \
                             f"errors {result.errors}"
