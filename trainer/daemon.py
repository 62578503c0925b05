"""The trainer process: consume votes into the store (training rounds build on it).

    kaizen train            # daemon until SIGINT/SIGTERM
    kaizen train --once     # drain what is on the topic now, then exit

Exposes Prometheus metrics on KAIZEN_TRAINER_PORT; `kaizen_trainer_ready` is
1 once the consumer has joined its group, which `kaizen up` waits for.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

from prometheus_client import start_http_server

from services.broker import ensure_topics
from services.settings import Settings
from trainer.consumer import PreferenceConsumer
from trainer.store import PreferenceStore

log = logging.getLogger(__name__)


def run(settings: Settings, *, once: bool = False, idle_polls_to_finish: int = 3) -> int:
    """Run the consumer; with `once`, stop after a few empty polls. Returns events stored."""
    ensure_topics(settings)
    store = PreferenceStore(settings.preferences_db)
    consumer = PreferenceConsumer(settings, store)
    if not once:
        start_http_server(settings.trainer_port, addr=settings.trainer_host)
        log.info("trainer metrics on http://%s:%d/metrics", settings.trainer_host, settings.trainer_port)

        def _stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping after the current poll", signum)
            consumer.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    log.info("consuming %s as group %s from %s (store: %s)", settings.topic_preferences,
             settings.consumer_group, settings.bootstrap_servers, settings.preferences_db)
    try:
        if once:
            idle = 0
            deadline = time.monotonic() + settings.kafka_max_poll_interval_ms / 1000 * 3
            while idle < idle_polls_to_finish:
                n = consumer.poll_once()
                # until the group is joined an empty poll means nothing
                idle = idle + 1 if (n == 0 and consumer.joined) else 0
                if time.monotonic() > deadline and not consumer.joined:
                    log.warning("could not join group %s in time", settings.consumer_group)
                    break
        else:
            consumer.run()
    finally:
        consumer.close()
        store.close()
    log.info("trainer stopped: %d stored, %d duplicates, %d dead-lettered",
             consumer.stats.stored, consumer.stats.duplicates, consumer.stats.dead_lettered)
    return consumer.stats.stored
