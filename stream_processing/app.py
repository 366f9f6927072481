"""The analytics pipeline process: Quix Streams consumer -> Polars -> one Postgres transaction.

``run(settings)`` is the registry target ``stream_processing.app:run`` (``pms serve pipeline``).
It migrates the ``analytics`` database, serves ``/health``, ``/ready`` and ``/metrics`` on
``settings.pipeline.port`` (so the supervisor can probe it like any service) and consumes
topic ``settings.kafka.topic`` in consumer group ``settings.pipeline.consumer_group``.
More processes in the same group share the partitions.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException, TopicPartition
from prometheus_client import Counter, Gauge
from quixstreams import Application
from quixstreams.models import TopicConfig
from quixstreams.models.serializers import Deserializer, SerializationContext
from sqlalchemy import Engine

from pms import db
from pms.settings import Settings
from pms.web import create_service_app
from stream_processing.sink import AnalyticsSink

log = logging.getLogger(__name__)


class PatientEventDeserializer(Deserializer):
    """Hands the protobuf ``PatientEvent`` bytes through untouched; the sink parses the batch.

    Quix runs the deserializer once per message in its one-message-at-a-time loop, where
    parsing, UUID and date checks cost more than everything else Quix does per message;
    :func:`stream_processing.transforms.parse_batch` does the same work for a whole batch
    at flush, validation and normalisation vectorised in Polars. Garbage and unknown event
    types still become dead letters there, stored in the same transaction as the good events
    of the batch, so one bad message neither stops the pipeline nor gets lost. (Quix's own
    protobuf extra is not used: it pins an older protobuf than ours.)
    """

    def __call__(self, value: bytes, ctx: SerializationContext) -> bytes:
        return value


def topic_config(settings: Settings) -> TopicConfig:
    """The topic as Quix creates it when missing; Tansu needs the retention given explicitly."""
    return TopicConfig(
        num_partitions=settings.kafka.partitions,
        replication_factor=1,
        extra_config={"retention.ms": str(settings.kafka.retention_ms), "retention.bytes": "-1"},
    )


class _Application(Application):
    """Quix's Application, plus a deadline on shutdown.

    On SIGTERM Quix finishes its loop, commits and leaves the group; against a broker that
    does not answer (or while still joining) that can hang well past a supervisor's patience.
    Exiting hard after ``STOP_GRACE_S`` is safe: offsets are only ever committed after the
    analytics transaction, so anything unfinished is simply redelivered.
    """

    STOP_GRACE_S = 3.0

    def _arm_watchdog(self) -> None:
        def _exit() -> None:
            log.warning("pipeline did not stop within %.0fs; exiting", self.STOP_GRACE_S)
            logging.shutdown()
            os._exit(0)

        timer = threading.Timer(self.STOP_GRACE_S, _exit)
        timer.daemon = True
        timer.start()

    def _on_sigterm(self, *args: Any) -> None:
        self._arm_watchdog()
        super()._on_sigterm(*args)

    def _on_sigint(self, *args: Any) -> None:
        self._arm_watchdog()
        super()._on_sigint(*args)


def build_application(settings: Settings) -> Application:
    """The Quix Application with the consumer settings that let groups join fast on Tansu.

    ``broker_availability_timeout=0`` turns off Quix's broker probe, and that is what lets the
    pipeline survive a broker that comes back empty. After an outage the probe sends an
    all-topics metadata request. That request does not mark a vanished topic as gone, so the
    consumer keeps fetching the old topic id. Tansu answers a fetch for an unknown topic with
    a zero topic id plus a leader hint. librdkafka (2.12 up to at least 2.16) then looks the
    hint's topic up by a NULL name and crashes with SIGSEGV in
    ``rd_kafka_metadata_cache_find``. Reproduced in 4 of 15 broker restarts with the probe,
    none in 37 without it (docs/readme/faults.md). Without the probe, GroupWatchdog below
    handles a consumer that stays outside its group.
    """
    return _Application(
        broker_address=settings.bootstrap_servers,
        consumer_group=settings.pipeline.consumer_group,
        auto_offset_reset="earliest",
        commit_interval=settings.pipeline.batch_timeout_s,
        commit_every=settings.pipeline.batch_size,
        broker_availability_timeout=0,
        consumer_extra_config={
            "session.timeout.ms": settings.kafka.session_timeout_ms,
            "heartbeat.interval.ms": settings.kafka.heartbeat_interval_ms,
        },
        consumer_poll_timeout=0.1,
        use_changelog_topics=False,
        state_dir=str(settings.data_dir / "pipeline-state"),
        loglevel="WARNING",
    )


class WatermarkProbe:
    """High watermarks for the lag figures, as last reported by the pipeline's own fetches.

    Fetch responses carry the partition's high watermark, so the cached value costs no
    round trip. (A ListOffsets request would be fresher, but Tansu 0.6 answers it wrongly:
    it reports the start of the last record batch + 1 instead of the log end.)
    """

    def __init__(self) -> None:
        self.application: Application | None = None

    def __call__(self, topic: str, partition: int) -> int | None:
        consumer = getattr(self.application, "_consumer", None)  # Quix keeps its consumer private
        if consumer is None:
            return None
        try:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
        except (KafkaException, RuntimeError):
            return None
        return int(high) if high is not None and high >= 0 else None


class GroupWatchdog:
    """Exit the process when the consumer has silently left its group and does not come back.

    After the broker disappears and returns, librdkafka sometimes loses its group membership
    ("Unknown member") and Quix keeps polling without ever rejoining: the process looks alive
    while analytics stop. A consumer with no member id for ``stall_s`` is that state; exiting
    (code 70) lets the supervisor, compose or ECS start a fresh process, which is safe because
    offsets only follow the analytics transaction. Idle extra replicas keep their member id,
    so they are not affected.
    """

    EXIT_CODE = 70

    def __init__(
        self,
        member_id: Callable[[], str | None],
        *,
        stall_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        self._member_id = member_id
        self._stall_s = stall_s
        self._clock = clock
        self._on_stall = on_stall or self._exit
        self._last_member = clock()

    def joined(self) -> bool:
        try:
            return bool(self._member_id())
        except (KafkaException, RuntimeError):
            return False

    def check(self) -> bool:
        """One look; returns False (after calling ``on_stall``) when the consumer is stuck."""
        now = self._clock()
        if self.joined():
            self._last_member = now
            return True
        if now - self._last_member >= self._stall_s:
            self._on_stall()
            return False
        return True

    def healthy(self) -> bool:
        """For /ready: not outside a group for longer than half the stall budget."""
        return self.joined() or self._clock() - self._last_member < self._stall_s / 2

    def _exit(self) -> None:
        log.error("consumer has been outside its group for %.0fs; exiting so it is restarted", self._stall_s)
        logging.shutdown()
        os._exit(self.EXIT_CODE)

    def start(self, interval_s: float = 2.0) -> threading.Thread:
        def loop() -> None:
            while self.check():
                time.sleep(interval_s)

        thread = threading.Thread(target=loop, name="pipeline-group-watchdog", daemon=True)
        thread.start()
        return thread


def _serve_status(settings: Settings, ready: dict[str, Any], sink: AnalyticsSink, engine: Engine) -> threading.Thread:
    """Serve /health, /ready and /metrics on the pipeline's port in a background thread."""
    import uvicorn

    def checks() -> dict[str, bool]:
        watchdog = ready.get("watchdog")
        consumer_ok = bool(ready.get("running")) and (watchdog is None or watchdog.healthy())
        return {"database": db.database_reachable(engine), "consumer": consumer_ok}

    app = create_service_app(name="pipeline", settings=settings, title="PMS analytics pipeline", ready=checks)
    registry = app.state.metrics_registry
    batches = Gauge("pipeline_batches_committed", "Sink transactions committed by this process", registry=registry)
    batches.set_function(lambda: sink.batches_written)
    p99 = Gauge("pipeline_freshness_p99_ms", "Freshness p99 over the recent window", registry=registry)
    p99.set_function(lambda: sink.freshness_percentiles()[1] or 0.0)
    Counter("pipeline_starts", "Pipeline process starts", registry=registry).inc()
    config = uvicorn.Config(app, host=settings.pipeline.host, port=settings.pipeline.port, log_config=None,
                            access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="pipeline-status", daemon=True)
    thread.start()
    return thread


def run(settings: Settings) -> None:
    """Run the pipeline until SIGTERM/SIGINT (Quix stops after committing its checkpoint)."""
    faulthandler.enable()  # a crash inside librdkafka leaves a Python stack in the log
    db.migrate(settings, "analytics")
    engine = db.make_engine(settings.database_url_for("analytics"), pool_size=2, max_overflow=2)
    probe = WatermarkProbe()
    sink = AnalyticsSink(engine, freshness_window=settings.pipeline.freshness_window, watermarks=probe)
    ready: dict[str, Any] = {"running": False}
    _serve_status(settings, ready, sink, engine)

    app = build_application(settings)
    probe.application = app
    topic = app.topic(
        settings.kafka.topic,
        value_deserializer=PatientEventDeserializer(),
        key_deserializer="bytes",
        config=topic_config(settings),
    )
    app.dataframe(topic).sink(sink)
    consumer = app._consumer  # Quix keeps its consumer private; memberid() is a local librdkafka call
    consumer.memberid()  # creates the librdkafka handle here, not racing from the watchdog thread
    watchdog = GroupWatchdog(consumer.memberid, stall_s=settings.pipeline.stall_timeout_s)
    ready["watchdog"] = watchdog
    watchdog.start()
    ready["running"] = True
    started = time.monotonic()
    log.info("pipeline starting", extra={"fields": {"topic": settings.kafka.topic,
                                                     "group": settings.pipeline.consumer_group}})
    try:
        app.run()
    finally:
        ready["running"] = False
        engine.dispose()
        log.info("pipeline stopped", extra={"fields": {"uptime_s": round(time.monotonic() - started, 1)}})
