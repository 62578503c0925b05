"""Operator tools for the preference store: stats, export for TRL, import of public pairs.

    kaizen prefs stats
    kaizen prefs export --format trl > prefs.jsonl
    kaizen prefs import ../shared/data/hh_harmless_train.jsonl

Imports are turned into Preference events and sent through `kaizen.preferences`,
so they take exactly the path live votes take (validation, DLQ, dedup). Their
event ids are derived from their content: importing a file twice adds nothing.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from kaizen.core.events import Answer, Message, PreferenceEvent
from kaizen.core.settings import Settings
from trainer.reward_data import pairs_from_events, read_pairs_file
from trainer.store import PreferenceStore

#: Namespace of the content-derived event ids of imported pairs.
IMPORT_NAMESPACE = uuid.UUID("6f1c9a52-8d0e-4a5b-9a57-4b1e6c2d7f10")
IMPORTED_VERSION = "external"


def trl_records(store: PreferenceStore) -> Iterator[dict[str, Any]]:
    """Votes 0/1 as TRL's conversational preference records (ties and both-bad make no pair)."""
    pairs, _ = pairs_from_events(ev for _, ev in store.events_between(0))
    for p in pairs:
        yield {"prompt": p.prompt,
               "chosen": [{"role": "assistant", "content": p.chosen}],
               "rejected": [{"role": "assistant", "content": p.rejected}]}


def imported_events(path: Path) -> list[PreferenceEvent]:
    """A pairs file ({prompt, chosen, rejected} or TRL JSONL) as Preference events, chosen = answer 0."""
    now = datetime.now(UTC)
    events = []
    for pair in read_pairs_file(path):
        digest = hashlib.sha256(json.dumps([pair.prompt, pair.chosen, pair.rejected]).encode()).hexdigest()
        events.append(PreferenceEvent(
            event_id=uuid.uuid5(IMPORT_NAMESPACE, digest),
            comparison_id=f"import-{digest[:32]}",
            user=f"import:{pair.source or path.name}"[:200],
            served_at=now, voted_at=now,
            messages=[Message.model_validate(m) for m in pair.prompt],
            answers=[Answer(text=pair.chosen, model_version=IMPORTED_VERSION),
                     Answer(text=pair.rejected, model_version=IMPORTED_VERSION)],
            choice=0,
        ))
    return events


def send_events(settings: Settings, events: list[PreferenceEvent]) -> int:
    producer = KafkaProducer(**settings.kafka_options(), client_id="kaizen-import",
                             acks="all", enable_idempotence=True)
    try:
        # keyed by the pseudonymous user, as the API's relay does: one user's votes stay in order
        futures = [producer.send(settings.topic_preferences, key=e.user.encode(), value=e.to_bytes())
                   for e in events]
        producer.flush()
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close()
    return len(events)


def topic_size(settings: Settings, topic: str) -> int:
    """Messages in a topic: high watermark minus log start, summed over partitions.

    The watermark is read from a fetch response, as Tansu's ListOffsets(latest)
    answers with the last batch's base offset rather than the end of the log.
    """
    consumer = KafkaConsumer(**settings.kafka_options(), client_id="kaizen-prefs",
                             enable_auto_commit=False, request_timeout_ms=settings.kafka_request_timeout_ms)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        if not tps:
            return 0
        consumer.assign(tps)
        starts = consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, starts[tp])
        for _ in range(20):
            if all(consumer.highwater(tp) is not None for tp in tps):
                break
            consumer.poll(timeout_ms=250, max_records=1)
        return sum(max(0, (consumer.highwater(tp) or 0) - starts[tp]) for tp in tps)
    finally:
        consumer.close()
