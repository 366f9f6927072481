"""The analytics pipeline process: Quix Streams consumer -> Polars -> one Postgres transaction.

``run(settings)`` is the registry target ``stream_processing.app:run`` (``pms serve pipeline``).
It migrates the ``analytics`` database, serves ``/health``, ``/ready`` and ``/metrics`` on
``settings.pipeline.port`` (so the supervisor can probe it like any service) and consumes
topic ``settings.kafka.topic`` in consumer group ``settings.pipeline.consumer_group``.
More processes in the same group share the partitions.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError
from prometheus_client import Counter, Gauge
from quixstreams import Application
from quixstreams.checkpointing.exceptions import CheckpointConsumerCommitError
from quixstreams.error_callbacks import default_on_consumer_error
from quixstreams.models import TopicConfig
from quixstreams.models.serializers import Deserializer, SerializationContext
from quixstreams.processing import ProcessingContext
from sqlalchemy import Engine

from pms import db
from pms.settings import Settings
from pms.web import create_service_app
from stream_processing.consumer_health import BrokerRestartGuard, GroupWatchdog, StarvationProbe, WatermarkProbe
from stream_processing.heartbeat import Heartbeat
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


class _CommitTolerantContext(ProcessingContext):
    """Quix's processing context, except that a failed offset commit drops the checkpoint instead of
    ending the process.

    Quix raises ``CheckpointConsumerCommitError`` out of ``Application.run()`` when the offset
    commit fails, and the process exits with code 1. After an empty broker restart that is the
    common case: a batch processed just before the broker died is committed to a broker that
    forgot the group ("Unknown member"). Dropping the checkpoint is safe here. The sinks were
    flushed first (step 1 of ``Checkpoint.commit``), so the analytics transaction has already
    committed. Offsets only ever follow that transaction, and the sink skips what it has already
    applied, so the events of the dropped checkpoint are at most redelivered and skipped.

    Failures that go on for ``give_up_after_s`` with no successful commit in between still end
    the process. The error is raised as before, so the supervisor restarts it.
    """

    #: How long commits may keep failing before the error is raised (the pipeline's stall budget).
    give_up_after_s: float = 60.0
    clock: Callable[[], float] = staticmethod(time.monotonic)
    commits_dropped: int = 0
    _failing_since: float | None = None

    def commit_checkpoint(self, force: bool = False, revoking: bool = False) -> None:
        commits = self._checkpoint is not None and (force or self.checkpoint.expired()) and not self.checkpoint.empty()
        try:
            super().commit_checkpoint(force=force, revoking=revoking)
        except CheckpointConsumerCommitError as exc:
            now = self.clock()
            self._failing_since = self._failing_since if self._failing_since is not None else now
            if now - self._failing_since >= self.give_up_after_s:
                raise
            self.commits_dropped += 1
            log.warning("offset commit failed: checkpoint dropped, its events will be redelivered and skipped",
                        extra={"fields": {"error": exc.description, "code": exc.code, "revoking": revoking}})
            self.init_checkpoint()
        else:
            if commits:
                self._failing_since = None


class _Application(Application):
    """Quix's Application, plus a deadline on shutdown and a failed offset commit that is not fatal.

    On SIGTERM Quix finishes its loop, commits and leaves the group; against a broker that
    does not answer (or while still joining) that can hang well past a supervisor's patience.
    Exiting hard after ``STOP_GRACE_S`` is safe: offsets are only ever committed after the
    analytics transaction, so anything unfinished is simply redelivered. For the same reason
    a failed offset commit only drops the checkpoint (:class:`_CommitTolerantContext`).
    """

    STOP_GRACE_S = 3.0

    def __init__(self, *args: Any, commit_failure_budget_s: float = 60.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Swapped before any StreamingDataFrame exists: app.dataframe() hands this object to them.
        old = self._processing_context
        self._processing_context = _CommitTolerantContext(
            **{f.name: getattr(old, f.name) for f in dataclasses.fields(old) if f.init})
        self._processing_context.give_up_after_s = commit_failure_budget_s
        self._rejoin_requested = False
        self.restart_guard: BrokerRestartGuard | None = None
        #: Held while the consumer is replaced and by the other threads' calls on it. Re-entrant:
        #: the SIGTERM handler takes it on the main thread, which may hold it already.
        self.client_lock = threading.RLock()
        #: Set on SIGTERM/SIGINT, under client_lock: no other thread calls the consumer after that.
        self.stopping = False
        #: How often the processing loop subscribed again on request.
        self.rejoins = 0
        #: time.monotonic() of the processing loop's latest turn (it turns at least every poll timeout).
        self.turned_at = time.monotonic()

    @property
    def commits_dropped(self) -> int:
        return self._processing_context.commits_dropped

    def request_rejoin(self) -> None:
        """Ask the processing loop for a fresh consumer; safe from any thread (it only sets a flag).

        A consumer that joined its group while the topic was missing holds no partitions,
        and no metadata request or new subscribe call changed that in the fault runs: every
        rejoin of that librdkafka handle came back with 0 partitions, while a new process got
        them at once. So the loop closes the handle (it leaves the group) and subscribes with
        a new one, which is what a restart does, without the restart. That has to happen on the
        thread that polls, so this only sets a flag that :meth:`_process_message` reads.
        """
        self._rejoin_requested = True

    def turning(self, within_s: float) -> bool:
        """Whether the processing loop took a turn in the last ``within_s`` seconds."""
        return time.monotonic() - self.turned_at <= within_s

    def _process_message(self, dataframe_composed: Any) -> None:
        self.turned_at = time.monotonic()
        if self._rejoin_requested:
            self._rejoin_requested = False
            self._renew_consumer()
        super()._process_message(dataframe_composed)

    def _renew_consumer(self) -> None:
        """Replace a librdkafka consumer that holds no partition by a new one in the same group.

        Only then: one with partitions is working, and one whose fetching the restart guard
        has paused is waiting for the broker. Offsets follow the analytics transaction, so a
        consumer without partitions has nothing to hand over. ``client_lock`` keeps the other
        threads (watchdog, /ready) off the handle while it is closed and replaced.
        """
        consumer = self._consumer
        guard = self.restart_guard
        with self.client_lock:
            inner = consumer._inner_consumer  # Quix creates it lazily and keeps it private
            if inner is None or inner.assignment() or (guard is not None and (guard.paused or not guard.settled())):
                return  # working, waiting for the broker, or mid-join (closing it then leaves a ghost member)
            self.rejoins += 1
            log.warning("consumer holds no partition: replacing it with a new one in the same group")
            inner.close()
            consumer._inner_consumer = None
            consumer.subscribe(
                topics=self._dataframe_registry.consumer_topics + self._topic_manager.changelog_topics_list,
                on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)

    def _arm_watchdog(self) -> None:
        def _exit() -> None:
            log.warning("pipeline did not stop within %.0fs; exiting", self.STOP_GRACE_S)
            logging.shutdown()
            os._exit(0)

        timer = threading.Timer(self.STOP_GRACE_S, _exit)
        timer.daemon = True
        timer.start()

    def _fence_other_threads(self) -> None:
        """Wait for a call in flight on another thread, then let none start: Quix is about to
        close the consumer, and a librdkafka call racing that close can crash the process."""
        with self.client_lock:
            self.stopping = True

    def _on_sigterm(self, *args: Any) -> None:
        self._arm_watchdog()
        self._fence_other_threads()
        super()._on_sigterm(*args)

    def _on_sigint(self, *args: Any) -> None:
        self._arm_watchdog()
        self._fence_other_threads()
        super()._on_sigint(*args)


def on_consumer_error(exc: Exception, message: Any, logger: logging.Logger) -> bool:
    """Quix's consumer-error callback: a topic that is missing for now is not fatal.

    After an empty broker restart the topic is gone until the outbox relay recreates it.
    librdkafka reports "Subscribed topic not available" through ``poll()`` whenever it updates
    the group in that window, and Quix's default callback makes the process exit on it. The
    topic comes back, and the restart guard and the watchdog bring the consumer back to it.
    Every other error is handled as Quix handles it.
    """
    if getattr(exc, "code", None) in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
        log.warning("subscribed topic not available yet: waiting for it", extra={"fields": {"code": exc.code}})
        return True
    return default_on_consumer_error(exc, message, logger)


def build_application(settings: Settings) -> _Application:
    """The Quix Application with the consumer settings that let groups join fast on Tansu and
    survive a broker that comes back empty (see :class:`BrokerRestartGuard`).

    ``broker_availability_timeout=0`` turns off Quix's broker probe. After an outage the probe
    sends an all-topics metadata request, which does not mark a vanished topic as gone and
    holds back the consumer's own refresh, so the consumer kept fetching the old topic id
    straight into the crash the guard prevents. GroupWatchdog (no member id for ``stall_s``,
    which librdkafka also reports after a broker outage longer than the session timeout) is
    the pipeline's stand-in for what the probe was for.
    """
    guard = BrokerRestartGuard(settings.kafka.topic, rejoin_timeout_s=settings.kafka.session_timeout_ms / 1000)
    app = _Application(
        broker_address=settings.bootstrap_servers,
        consumer_group=settings.pipeline.consumer_group,
        auto_offset_reset="earliest",
        commit_interval=settings.pipeline.batch_timeout_s,
        commit_every=settings.pipeline.batch_size,
        broker_availability_timeout=0,
        on_consumer_error=on_consumer_error,
        commit_failure_budget_s=settings.pipeline.stall_timeout_s,
        consumer_extra_config={
            "session.timeout.ms": settings.kafka.session_timeout_ms,
            "heartbeat.interval.ms": settings.kafka.heartbeat_interval_ms,
            "statistics.interval.ms": BrokerRestartGuard.STATS_INTERVAL_MS,
            "fetch.wait.max.ms": settings.pipeline.fetch_wait_ms,
            "stats_cb": guard.on_stats,
        },
        consumer_poll_timeout=0.1,
        use_changelog_topics=False,
        state_dir=str(settings.data_dir / "pipeline-state"),
        loglevel="WARNING",
    )
    guard.consumer = lambda: app._consumer._consumer  # Quix keeps its confluent-kafka consumer private
    guard.request_rejoin = app.request_rejoin
    app.restart_guard = guard
    return app


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


#: Seconds without a turn of the processing loop after which the pipeline counts as stuck (no heartbeat):
#: a batch write normally takes well under a second, a catch-up batch of 5,000 events about one.
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
    starvation = StarvationProbe(settings.kafka.topic, lambda: consumer._consumer,
                                 group_state=lambda: app.restart_guard.group_state)

    def member_id() -> str | None:
        with app.client_lock:  # not while the processing loop replaces the consumer, nor once stopping
            if app.stopping:
                raise RuntimeError("stopping")
            return consumer.memberid()

    def starved() -> bool | None:
        with app.client_lock:
            return None if app.stopping else starvation()

    watchdog = GroupWatchdog(member_id, stall_s=settings.pipeline.stall_timeout_s,
                             starved=starved, nudge=app.request_rejoin)
    ready["watchdog"] = watchdog
    watchdog.start()

    def consuming() -> bool:
        """For the heartbeat: the loop turns (a batch write held for half the stall budget is stuck, the
        watchdog's own measure), the broker is up (the restart guard has not paused fetching), the
        consumer is in its group and holds partitions."""
        guard = app.restart_guard
        if (not app.turning(within_s=settings.pipeline.stall_timeout_s / 2)
                or (guard is not None and guard.paused) or not watchdog.healthy()):
            return False
        with app.client_lock:
            inner = None if app.stopping else consumer._inner_consumer  # Quix keeps it private
            return inner is not None and bool(inner.assignment())

    heartbeat = Heartbeat(engine, interval_s=settings.pipeline.heartbeat_s, alive=consuming)
    heartbeat.start()
    ready["running"] = True
    started = time.monotonic()
    log.info("pipeline starting", extra={"fields": {"topic": settings.kafka.topic,
                                                     "group": settings.pipeline.consumer_group}})
    try:
        app.run()
    finally:
        ready["running"] = False
        heartbeat.stop()  # waits for a beat in flight: none after the engine is gone
        engine.dispose()
        log.info("pipeline stopped", extra={"fields": {"uptime_s": round(time.monotonic() - started, 1)}})
