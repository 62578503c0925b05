"""The outbox relay: accepted votes from the API's outbox (SQLite or the shared PostgreSQL) to Kafka.

Runs as a thread in the API process (kafka-python is synchronous). A row is
marked delivered only after the broker acknowledged it (`acks="all"`,
idempotent producer); a crash before that re-sends it, and the trainer's
store ignores the repeat by `event_id`. Delivered rows are kept for
`KAIZEN_OUTBOX_RETENTION` so they can be sent again if the broker loses them.

The embedded broker keeps its log in memory, so a restart silently empties
the topic. The relay notices in two ways: an acknowledged offset that is not
above the highest one it saw before (a live log only grows), and, while idle,
a topic end offset below that mark (checked every
`KAIZEN_OUTBOX_CHECK_INTERVAL_S`). Either way it marks every retained event
pending again and re-sends them all.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from kaizen.core import metrics
from kaizen.core.broker import BrokerError, ensure_topics
from services.comparisons import ComparisonStore
from kaizen.core.settings import Settings

log = logging.getLogger(__name__)


class OutboxRelay:
    """Owns its producer: stop flag, bounded waits, explicit close."""

    def __init__(self, settings: Settings, store: ComparisonStore) -> None:
        self.settings = settings
        self.store = store
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer: KafkaProducer | None = None
        self._last_check = 0.0
        self._last_prune = 0.0
        self.resets = 0

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0, flush_s: float = 5.0) -> None:
        """Stop the thread, then try for `flush_s` to deliver what is still pending (a pod
        being replaced should hand its votes to Kafka, not leave them on its disk). Returns
        within about `timeout_s + flush_s` even while no broker answers: a thread still waiting
        on one after `timeout_s` is left to die with the process, and nothing is flushed."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("outbox relay still waiting on Kafka after %.0f s; undelivered votes stay in %s",
                            timeout_s, self.store.where)
                return
        deadline = time.monotonic() + flush_s
        try:
            while (left := deadline - time.monotonic()) > 0 and self.deliver_once(connect_s=left) > 0:
                pass
        except Exception as exc:  # noqa: BLE001 - the votes stay in the outbox for the next start
            log.warning("final outbox flush failed (%s); undelivered votes stay in %s", exc, self.store.where)
        self._close_producer()

    def notify(self) -> None:
        """A vote was written: deliver now rather than at the next poll."""
        self._wake.set()

    # -- kafka ---------------------------------------------------------------------------
    def _producer_or_new(self, connect_s: float) -> KafkaProducer:
        """The producer; a new one waits at most `connect_s` for the topics and again for the
        broker (BrokerError, KafkaError)."""
        if self._producer is None:
            # Make the topics first: a broker that restarted empty would otherwise
            # auto-create the topic on our first send, with its default partitions.
            ensure_topics(self.settings, timeout_s=connect_s)
            self._producer = KafkaProducer(
                **self.settings.kafka_options(bootstrap_timeout_s=connect_s),
                client_id="kaizen-outbox",
                acks="all",
                enable_idempotence=True,
                linger_ms=5,  # a few ms of batching: many votes share one request
                max_block_ms=self.settings.kafka_request_timeout_ms,
                request_timeout_ms=self.settings.kafka_request_timeout_ms,
                delivery_timeout_ms=self.settings.kafka_request_timeout_ms * 2,
                metadata_max_age_ms=self.settings.kafka_metadata_max_age_ms,
            )
        return self._producer

    def _close_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=2)
            except KafkaError:
                pass
            self._producer = None

    def broker_holds(self, marks: dict[int, int]) -> bool:
        """True if each partition's log still reaches the highest acknowledged offset.

        Reads the high watermark from a fetch at that offset: Tansu answers a
        ListOffsets(latest) with the last *batch's* base offset + 1, which is
        not the end of the log, so `end_offsets` cannot be trusted here.
        """
        consumer = KafkaConsumer(**self.settings.kafka_options(),
                                 client_id="kaizen-outbox-check", enable_auto_commit=False,
                                 auto_offset_reset="earliest",
                                 request_timeout_ms=self.settings.kafka_request_timeout_ms)
        try:
            parts = consumer.partitions_for_topic(self.settings.topic_preferences) or set()
            if not set(marks) <= parts:
                return False
            tps = {p: TopicPartition(self.settings.topic_preferences, p) for p in marks}
            consumer.assign(list(tps.values()))
            for p, mark in marks.items():
                consumer.seek(tps[p], mark)
            deadline = time.monotonic() + self.settings.kafka_request_timeout_ms / 1000
            while time.monotonic() < deadline and any(consumer.highwater(tp) is None for tp in tps.values()):
                consumer.poll(timeout_ms=200, max_records=1)
            return all((consumer.highwater(tps[p]) or 0) > mark for p, mark in marks.items())
        finally:
            consumer.close()

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.settings.outbox_backoff_min_s
        while not self._stop.is_set():
            try:
                self.prune()
                sent = self.deliver_once()
                backoff = self.settings.outbox_backoff_min_s
                if sent == 0:
                    self.housekeeping()
                    self._wake.wait(self.settings.outbox_poll_interval_s)
                    self._wake.clear()
            except (KafkaError, BrokerError) as exc:  # Kafka down or unreachable: no traceback
                metrics.OUTBOX_DELIVERY_ERRORS.inc()
                log.warning("outbox delivery failed (%s); retrying in %.1f s", exc, backoff)
                self._close_producer()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.settings.outbox_backoff_max_s)
            except Exception:  # never let the relay thread die: votes would pile up unseen
                metrics.OUTBOX_DELIVERY_ERRORS.inc()
                log.exception("outbox relay error; retrying in %.1f s", backoff)
                self._close_producer()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.settings.outbox_backoff_max_s)
            finally:
                self.update_metrics()

    def deliver_once(self, connect_s: float | None = None) -> int:
        """Send one batch of pending rows and mark the acknowledged ones; return how many. A new
        producer waits up to `connect_s` (default: the Kafka request timeout) for the broker.

        The rows are claimed first (services/comparisons.py, `claim`): with several API
        replicas on one PostgreSQL each relay sends rows no other relay holds. Events are
        keyed by the pseudonymous user, so one user's votes land on one partition in order."""
        # Read before sending: offsets another relay recorded before this point were acknowledged
        # before our sends, so on a live log ours are above them; one at or below means data loss.
        marks = self.store.max_acked_offsets()
        with self.store.claim(self.settings.outbox_batch_size) as claim:
            if not claim.rows:
                return 0
            producer = self._producer_or_new(connect_s or self.settings.kafka_request_timeout_ms / 1000)
            futures = [
                (row.seq,
                 producer.send(self.settings.topic_preferences, key=row.key.encode(), value=row.payload))
                for row in claim.rows
            ]
            producer.flush(timeout=self.settings.kafka_request_timeout_ms / 1000)
            acked: list[int] = []
            offsets: dict[int, list[int]] = {}
            error: Exception | None = None
            for seq, fut in futures:
                try:
                    md = fut.get(timeout=0)
                except Exception as exc:  # noqa: BLE001 - each record's own failure
                    error = error or exc
                    continue
                acked.append(seq)
                offsets.setdefault(md.partition, []).append(md.offset)
            lost = any(min(offs) <= marks.get(p, -1) for p, offs in offsets.items())
            claim.mark_delivered(acked, {p: max(offs) for p, offs in offsets.items()})
        if lost:
            self._redeliver("an acknowledged offset went backwards")
        if error is not None:
            raise error if isinstance(error, KafkaError) else KafkaError(str(error))
        return len(acked)

    def housekeeping(self) -> None:
        """While idle: check the broker still holds what it acknowledged; prune old rows."""
        now = time.monotonic()
        if now - self._last_check < self.settings.outbox_check_interval_s:
            return
        self._last_check = now
        marks = self.store.max_acked_offsets()
        if marks and not self.broker_holds(marks):
            ensure_topics(self.settings)
            self._redeliver(f"the log no longer reaches the acknowledged offsets {marks}")

    def prune(self) -> None:
        """Retention, on its own clock and whether or not Kafka answers (a broker outage must
        not keep personal data past its time): delivered outbox rows after `outbox_retention`,
        unvoted comparisons one TTL after they expired, voted ones after `comparison_retention`."""
        now = time.monotonic()
        if now - self._last_prune < self.settings.retention_check_interval_s:
            return
        self._last_prune = now
        wall = datetime.now(UTC)
        batch = self.settings.retention_batch_size
        pruned = self.store.prune_delivered(wall - self.settings.outbox_retention, batch)
        expired = self.store.purge_expired(wall, batch)
        voted = self.store.purge_voted(wall - self.settings.comparison_retention, batch)
        if pruned or expired or voted:
            log.info("retention: deleted %d delivered outbox rows, %d expired and %d voted comparisons",
                     pruned, expired, voted)

    def _redeliver(self, why: str) -> None:
        n = self.store.redeliver_all()
        self.resets += 1
        metrics.OUTBOX_REDELIVERIES.inc()
        log.warning("broker lost acknowledged votes (%s): re-sending %d retained events", why, n)

    def update_metrics(self) -> None:
        pending, oldest = self.store.outbox_backlog()
        metrics.OUTBOX_PENDING.set(pending)
        metrics.OUTBOX_OLDEST_PENDING_AGE.set(
            (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0)
