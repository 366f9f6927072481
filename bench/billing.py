"""Billing: gRPC CreateBillingAccount QPS and p99 at 1, 16 and 64 in flight.

Baseline: the standard gRPC health Check on the same server and channel, i.e. the transport's own cost.
"""

from __future__ import annotations

import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import Report, Row, cpu_per_request, cpu_seconds, run_load, services
from billing.client import BillingClient
from pms.settings import Settings

CONCURRENCY = (1, 16, 64)


def run(settings: Settings, report: Report, *, total: int = 2000) -> None:
    with services(settings, ["billing"]):
        address = settings.billing.address
        client = BillingClient(address)
        channel = grpc.insecure_channel(address)
        health = health_pb2_grpc.HealthStub(channel)

        def check(_: int) -> bool:
            return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1

        def create(_: int) -> bool:
            client.create_account(patient_id=str(uuid.uuid4()), name="Bench Patient", email="b@example.org",
                                  timeout=5)
            return True

        run_load(create, total=200, concurrency=4)  # warm-up: connections, pool, plans
        for concurrency in CONCURRENCY:
            cpu0 = cpu_seconds(("billing",))
            base = run_load(check, total=total, concurrency=concurrency)
            cpu1 = cpu_seconds(("billing",))
            real = run_load(create, total=total, concurrency=concurrency)
            cpu2 = cpu_seconds(("billing",))
            if concurrency == 16:
                # CPU is steadier than QPS on a noisy box: it says what a call costs, not how busy the host is.
                check_cpu, create_cpu = cpu_per_request(cpu0, cpu1, total), cpu_per_request(cpu1, cpu2, total)
                for key in ("billing", "postgres"):
                    report.add(Row("billing", f"CPU per CreateBillingAccount @16: {key}", create_cpu.get(key, 0.0),
                                   "ms", baseline=check_cpu.get(key, 0.0) or None,
                                   note="psutil user+system; baseline: the same per health Check"))
            report.add(Row("billing", f"CreateBillingAccount QPS @{concurrency}", real.qps, "req/s",
                           baseline=base.qps, note="baseline: gRPC health Check"))
            report.add(Row("billing", f"CreateBillingAccount p99 @{concurrency}", real.p99, "ms",
                           baseline=base.p99))
        client.close()
        channel.close()
