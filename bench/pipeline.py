"""Pipeline: events/s into the analytics tables, and freshness at a steady 200 events/s.

Throughput: ``EVENTS`` PatientEvents are put on the topic first; then (1) a raw confluent-kafka
consumer reads them all and parses each protobuf -- the baseline, in the same run, over the same
topic -- and (2) the real pipeline process (``pms serve pipeline``) applies them. Its rate is
taken from ``pipeline_status.events_processed`` between its first and its last commit, so the
consumer group join (~3 s on Tansu) is reported apart. Target (issue 5): >= 0.3x of the raw loop.

Ceiling: (3) the same Quix Streams consumer loop, deserializer and sink ``add`` as the pipeline's,
with a sink whose flush writes nothing, over the same topic in its own consumer group: how fast
Quix alone can go here, i.e. the most the pipeline could reach with a free database.

Freshness: then events are produced at a steady 200/s with ``occurred_at`` = now, and the
pipeline's own freshness p50/p99 (``occurred_at`` -> analytics commit, over a window of exactly
those events) is read from ``pipeline_status``. Baseline: bare produce -> consume latency at the
same rate on the same broker. Target (issue 5): p99 <= 1 s.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, date, datetime, timedelta

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from quixstreams import Application

from api.patient.relay import ensure_topic, producer_config
from bench.harness import (
    Report,
    Row,
    paced,
    percentile,
    pg_connect,
    pipeline_processed,
    raw_produce_consume_latency,
    services,
)
from pms import process
from pms.contracts import patient_events_pb2
from pms.settings import Settings
from stream_processing import app as app_module
from stream_processing.sink import AnalyticsSink, Record

EVENTS = 50_000
STEADY_RATE = 200.0
STEADY_SECONDS = 10
_GENDERS = ("female", "male", "other", "unknown")
_CITIES = tuple(f"City {i}" for i in range(200))


def _event(rng: random.Random, *, occurred_at: datetime) -> patient_events_pb2.PatientEvent:
    birth = date(1930, 1, 1) + timedelta(days=rng.randrange(30_000))
    return patient_events_pb2.PatientEvent(
        event_id=str(uuid.uuid4()),
        event_type=patient_events_pb2.EventType.Value("PATIENT_CREATED"),
        patient_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        version=1,
        occurred_at=occurred_at.isoformat(),
        name="Bench Patient",
        email="bench@example.org",
        gender=rng.choice(_GENDERS),
        date_of_birth=birth.isoformat(),
        registered_date=max(birth, date(2020, 1, 1) + timedelta(days=rng.randrange(1500))).isoformat(),
        city=rng.choice(_CITIES),
        billing_status="PENDING",
    )


def run(settings: Settings, report: Report, *, events: int = EVENTS) -> None:
    steady = int(STEADY_RATE * STEADY_SECONDS)
    settings.pipeline.freshness_window = steady
    topic = settings.kafka.topic
    ensure_topic(AdminClient({"bootstrap.servers": settings.bootstrap_servers, "log_level": 3}), settings)
    producer = Producer(producer_config(settings) | {"linger.ms": 20})
    rng = random.Random(7)
    now = datetime.now(UTC)
    for _ in range(events):
        event = _event(rng, occurred_at=now)
        while True:
            try:
                producer.produce(topic, key=event.patient_id.encode(), value=event.SerializeToString())
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(60)

    # The raw loop is short and the machine noisy: take the better of a run before and one after.
    raw_rates = [_raw_consume(settings, events)]
    quix_rate = _quix_noop_consume(settings, events)

    with services(settings, ["pipeline"]):
        ready_at = time.perf_counter()
        samples: list[tuple[float, int]] = []

        def caught_up() -> bool:
            samples.append((time.perf_counter(), pipeline_processed(settings)))
            return samples[-1][1] >= events

        process.wait_until(caught_up, timeout=120 + events / 200, interval=0.05,
                           message="pipeline to apply the backlog")
        first_t, first_n = next((t, n) for t, n in samples if n > 0)
        done_t = samples[-1][0]
        rate = (events - first_n) / (done_t - first_t) if done_t > first_t else float("nan")
        raw_rates.append(_raw_consume(settings, events))
        raw_rate = max(raw_rates)
        report.add(Row("pipeline", "raw consume + protobuf parse", raw_rate, "events/s",
                       note=f"{events} events, confluent-kafka consume(1000) + PatientEvent.FromString; "
                            f"best of {', '.join(f'{r:.0f}' for r in raw_rates)}"))
        report.add(Row("pipeline", "events/s into analytics (first -> last commit)", rate, "events/s",
                       baseline=raw_rate, target=">= 0.3x", note="baseline: raw consume + parse, same topic"))
        report.add(Row("pipeline", "Quix loop, sink writing nothing (ceiling)", quix_rate, "events/s",
                       baseline=raw_rate, note="same deserializer and sink.add as the pipeline, in-process, "
                                               "first -> last message; baseline: raw consume + parse"))
        report.add(Row("pipeline", "group join + first batch", first_t - ready_at, "s",
                       note="process ready -> first commit in pipeline_status"))

        def send(_i: int) -> None:
            event = _event(rng, occurred_at=datetime.now(UTC))
            producer.produce(topic, key=event.patient_id.encode(), value=event.SerializeToString())
            producer.poll(0)

        paced(send, rate=STEADY_RATE, total=steady, workers=1)
        producer.flush(10)
        process.wait_until(lambda: pipeline_processed(settings) >= events + steady, timeout=60, interval=0.05,
                           message="pipeline to apply the steady events")
        with pg_connect(settings, "analytics") as conn:
            p50, p99, count = conn.execute(
                "SELECT freshness_p50_ms, freshness_p99_ms, freshness_samples FROM pipeline_status WHERE id = 1"
            ).fetchone()
    floor = raw_produce_consume_latency(settings, topic="bench-pipeline-raw", rate=STEADY_RATE, total=steady)
    note = f"{steady} events at {STEADY_RATE:.0f}/s, window {count}; baseline: bare produce -> consume"
    report.add(Row("pipeline", "freshness p50 @200/s", p50, "ms", baseline=percentile(floor, 50), note=note))
    report.add(Row("pipeline", "freshness p99 @200/s", p99, "ms", baseline=percentile(floor, 99),
                   target="<= 1000 ms", note=note))


class _NoWriteSink(AnalyticsSink):
    """The pipeline's sink minus the database: counts what Quix hands it and stops the app at ``total``."""

    def __init__(self, total: int) -> None:
        super().__init__(None, freshness_window=1)  # type: ignore[arg-type] -- never touches the engine
        self.total = total
        self.seen = 0
        self.first: float | None = None
        self.first_size = 0
        self.last: float | None = None
        self.application: Application | None = None

    def setup(self) -> None:
        pass

    def _apply(self, records: list[Record]) -> None:
        if self.first is None:  # the first checkpoint: the group has been joined
            self.first, self.first_size = time.perf_counter(), len(records)
        self.seen += len(records)
        if self.seen >= self.total and self.last is None:
            self.last = time.perf_counter()
            assert self.application is not None
            self.application.stop()


def _quix_noop_consume(settings: Settings, events: int) -> float:
    """Events/s through Quix with the pipeline's per-message path and a sink that writes nothing.

    Timed between the first and the last checkpoint flush, like the pipeline's own rate.
    """
    cfg = settings.model_copy(update={"pipeline": settings.pipeline.model_copy(
        update={"consumer_group": "bench-quix-noop"})})
    application = app_module.build_application(cfg)
    sink = _NoWriteSink(events)
    sink.application = application
    topic = application.topic(cfg.kafka.topic, value_deserializer=app_module.PatientEventDeserializer(),
                              key_deserializer="bytes", config=app_module.topic_config(cfg))
    application.dataframe(topic).sink(sink)
    application.run()
    if sink.last is None or sink.first is None:
        raise RuntimeError(f"the Quix loop saw only {sink.seen} of {events} events")
    if sink.last <= sink.first:
        return float("nan")
    return (sink.seen - sink.first_size) / (sink.last - sink.first)


def _raw_consume(settings: Settings, events: int) -> float:
    """Events/s of a bare consume + parse loop over the whole topic."""
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "bench-raw",
                         "enable.auto.commit": False, "log_level": 3})
    topic = settings.kafka.topic
    partitions = consumer.list_topics(topic, timeout=5).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    parsed = 0
    deadline = time.monotonic() + 120
    start = time.perf_counter()
    try:
        while parsed < events and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=0.5):
                if message.error():
                    continue
                patient_events_pb2.PatientEvent.FromString(message.value())
                parsed += 1
        seconds = time.perf_counter() - start
    finally:
        consumer.close()
    if parsed < events:
        raise RuntimeError(f"raw consumer read only {parsed} of {events} events")
    return parsed / seconds
