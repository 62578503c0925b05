"""Kafka → preference store, committing offsets only after the store commits.

    kaizen train          # runs this consumer (and the training rounds, trainer/daemon.py)

Each poll's batch is validated with the API's own event model; valid events
go into SQLite in one transaction, invalid ones to the dead-letter topic with
the reason; only then are the offsets committed. A crash between the store
commit and the offset commit redelivers the batch, and the store's primary
key (`event_id`) turns that redelivery into no-ops: effectively exactly once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

from kaizen.core import metrics
from kaizen.core.events import InvalidEvent, PreferenceEvent, parse_preference
from kaizen.core.settings import Settings
from trainer.store import PreferenceStore

log = logging.getLogger(__name__)


@dataclass
class ConsumeStats:
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    erased: int = 0
    pruned: int = 0


class _RebalanceFlag(ConsumerRebalanceListener):  # type: ignore[misc]  # kafka-python ships no types
    """Remembers that partitions were (re)assigned during a poll."""

    def __init__(self) -> None:
        self.assigned = False

    def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.assigned = True


class PreferenceConsumer:
    """Owns a consumer and a DLQ producer: stop flag, bounded poll, explicit close."""

    def __init__(self, settings: Settings, store: PreferenceStore) -> None:
        self.settings = settings
        self.store = store
        self.stats = ConsumeStats()
        self._stop = threading.Event()
        self.consumer = self._new_consumer()  # sets self._rebalance, the new consumer's listener
        self._last_progress = time.monotonic()
        self._last_prune = 0.0
        self.reopened = 0
        """How many times a stalled consumer was replaced (see `_check_stall`)."""
        self.dlq = KafkaProducer(
            **settings.kafka_options(),
            client_id="kaizen-trainer-dlq",
            acks="all",
            retries=5,
        )

    def _new_consumer(self) -> KafkaConsumer:
        settings = self.settings
        self._rebalance: _RebalanceFlag = _RebalanceFlag()
        consumer = KafkaConsumer(
            **settings.kafka_options(),
            group_id=settings.consumer_group,
            client_id="kaizen-trainer",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
            request_timeout_ms=max(settings.kafka_request_timeout_ms, settings.kafka_session_timeout_ms + 1000),
            metadata_max_age_ms=settings.kafka_metadata_max_age_ms,
        )
        consumer.subscribe([settings.topic_preferences], listener=self._rebalance)
        return consumer

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """`stop` was called (a signal, say): the owner's loop ends after the current poll."""
        return self._stop.is_set()

    @property
    def joined(self) -> bool:
        return bool(self.consumer.assignment())

    def prune(self) -> int:
        """Delete votes past `preference_retention`, every `retention_check_interval_s` (also
        while the broker is down: the store is local). Returns the rows deleted this time."""
        now = time.monotonic()
        if self._last_prune and now - self._last_prune < self.settings.retention_check_interval_s:
            return 0
        self._last_prune = now
        n = self.store.prune(datetime.now(UTC) - self.settings.preference_retention)
        if n:
            log.info("retention: deleted %d votes received over %s ago", n, self.settings.preference_retention)
        self.stats.pruned += n
        return n

    def poll_once(self) -> int:
        """Handle one poll's batch; return how many records it held."""
        self.prune()
        batch = self.consumer.poll(timeout_ms=self.settings.kafka_poll_timeout_ms)
        if self._rebalance.assigned:
            # kafka-python keeps in-memory positions across a rebalance. After a broker
            # that lost its log (the embedded one keeps it in memory) those positions
            # point past events re-sent to the new log: reading on from them would skip
            # those events for good. So after any (re)assignment, drop what this poll
            # fetched and restart from the group's committed offsets (the beginning if
            # there are none); the store ignores what it already holds.
            self._rebalance.assigned = False
            self._seek_to_committed()
            return 0
        records = [r for part in batch.values() for r in part]
        self._record_lag()
        if not records:
            self._check_stall()
            return 0
        self._last_progress = time.monotonic()
        valid: list[PreferenceEvent] = []
        for rec in records:
            try:
                valid.append(parse_preference(rec.value))
            except InvalidEvent as exc:
                self._dead_letter(rec, str(exc))
        self.dlq.flush()
        result = self.store.add_many(valid)
        try:
            self.consumer.commit()  # only after the store and the DLQ hold the batch
        except KafkaError as exc:  # e.g. the group was rebalanced under us
            log.warning("offset commit failed (%s): re-reading from the committed offsets", exc)
            self._seek_to_committed()
        self.stats.stored += result.stored
        self.stats.duplicates += result.duplicates
        self.stats.erased += result.erased
        metrics.EVENTS_CONSUMED.labels(outcome="stored").inc(result.stored)
        metrics.EVENTS_CONSUMED.labels(outcome="duplicate").inc(result.duplicates)
        metrics.EVENTS_CONSUMED.labels(outcome="erased").inc(result.erased)
        metrics.PREFERENCES_STORED.set(self.store.count())
        for ev in valid:
            log.info("received preference event %s (comparison %s, choice %s)",
                     ev.event_id, ev.comparison_id, ev.choice)
        return len(records)

    def _record_lag(self) -> None:
        """Consumer lag from the client's own fetch metadata (no extra broker request)."""
        lag = 0
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            try:
                lag += max(0, high - self.consumer.position(tp, timeout_ms=0))
            except Exception:  # position unknown right after a reassignment
                continue
        metrics.TRAINER_CONSUMER_LAG.set(lag)

    def _check_stall(self) -> None:
        """Replace the consumer when it has fetched nothing for `kafka_stall_timeout_s` although its
        partitions hold events past the committed offsets: a client stuck in a group rejoin
        (after a broker restart) never recovers by itself. Idle (nothing unread): left alone."""
        if time.monotonic() - self._last_progress < self.settings.kafka_stall_timeout_s:
            return
        self._last_progress = time.monotonic()  # at most one check per window
        # only this member's partitions: another member's slow partition is not this one's stall
        # (a client stuck in a rejoin still lists the partitions it had)
        tps = sorted(self.consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        try:
            ends = self.consumer.end_offsets(tps) if tps else {}
            behind = {tp: end for tp, end in ends.items() if end > (self.consumer.committed(tp) or 0)}
        except Exception as exc:  # noqa: BLE001 - broker unreachable: the client retries by itself
            log.info("stall check skipped: %s", exc)
            return
        if not behind:
            return
        log.warning("no records for %.0f s while %s hold unread events: reopening the consumer",
                    self.settings.kafka_stall_timeout_s, sorted(str(tp) for tp in behind))
        try:
            self.consumer.close(autocommit=False)
        except Exception as exc:  # noqa: BLE001 - closing a stuck client may fail; a new one replaces it
            log.warning("closing the stalled consumer failed: %s", exc)
        self.consumer = self._new_consumer()
        self.reopened += 1

    def _seek_to_committed(self) -> None:
        for tp in self.consumer.assignment():
            committed = self.consumer.committed(tp)
            if committed is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)

    def _dead_letter(self, rec: Any, reason: str) -> None:
        topic, partition, offset = rec.topic, rec.partition, rec.offset
        raw: bytes = rec.value or b""
        log.warning("dead-lettering %s[%s]@%s: %s", topic, partition, offset, reason[:300])
        value = {
            "reason": reason,
            "source": {"topic": topic, "partition": partition, "offset": offset},
            "raw": raw.decode("utf-8", errors="backslashreplace"),
        }
        self.dlq.send(self.settings.topic_preferences_dlq, key=rec.key,
                      value=json.dumps(value).encode())
        self.stats.dead_lettered += 1
        metrics.EVENTS_CONSUMED.labels(outcome="dead_lettered").inc()

    def run(self) -> None:
        """Poll until `stop()`; each iteration is bounded by the poll timeout."""
        try:
            while not self._stop.is_set():
                self.poll_once()
                metrics.TRAINER_READY.set(1 if self.joined else 0)
        finally:
            metrics.TRAINER_READY.set(0)

    def close(self) -> None:
        self.consumer.close()
        self.dlq.close()
