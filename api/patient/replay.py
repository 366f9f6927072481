"""Republish the outbox history to the event topic (``pms replay [--from DATE]``).

For rebuilding analytics from scratch: consumers apply events idempotently by
(patient_id, version), so publishing history again never double counts. Order is outbox
order, keys are patient ids, so each patient's events arrive in version order.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time

from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from api.patient import repository as patient_repository
from api.patient.relay import ensure_topic, producer_config
from pms import db
from pms.settings import Settings

READ_BATCH = 5_000
FLUSH_TIMEOUT_S = 60.0


class ReplayFailed(RuntimeError):
    """Some events could not be delivered (the broker went away during the replay)."""


def run(settings: Settings, *, since: date | None = None, show_progress: bool = True) -> int:
    """Publish every outbox event (occurred on or after ``since``, UTC) again; return how many.

    Raises:
        ReplayFailed: the broker did not take every event (run it again: it is idempotent).
    """
    since_at = datetime.combine(since, time.min, tzinfo=UTC) if since else None
    ensure_topic(AdminClient({"bootstrap.servers": settings.bootstrap_servers, "log_level": 3}), settings)
    engine = db.make_engine(settings.database_url_for("patients"), pool_size=1, max_overflow=0)
    factory = db.session_factory(engine)
    producer = Producer(producer_config(settings))
    failures = 0

    def _on_delivery(err: KafkaError | None, _msg: Message) -> None:
        nonlocal failures
        if err is not None:
            failures += 1

    sent = 0
    columns = (TextColumn("[bold]replaying events"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    try:
        with factory() as session, Progress(*columns, disable=not show_progress) as progress:
            total = patient_repository.outbox_count(session, since=since_at)
            task = progress.add_task("replay", total=total)
            for patient_id, payload in patient_repository.outbox_history(session, since=since_at, batch=READ_BATCH):
                while True:
                    try:
                        producer.produce(settings.kafka.topic, key=str(patient_id).encode(), value=payload,
                                         on_delivery=_on_delivery)
                        break
                    except BufferError:
                        producer.poll(0.1)
                sent += 1
                if sent % 1000 == 0:
                    producer.poll(0)
                    progress.update(task, completed=sent)
            remaining = producer.flush(FLUSH_TIMEOUT_S)
            progress.update(task, completed=sent)
    finally:
        engine.dispose()
    if failures or remaining:
        raise ReplayFailed(f"{failures + remaining} of {sent} events were not delivered")
    return sent
