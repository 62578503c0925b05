"""Group commit for votes: one writer thread, many votes per transaction.

`POST /v1/feedback` hands its vote to `VoteWriter.submit` and awaits the verdict. The
writer thread takes every vote waiting (at most `vote_batch_max`) and commits them in one
transaction (`ComparisonStore.vote_many`): each vote is judged on its own (its user's vote
limit, its comparison, room in the outbox), the accepted ones' events go into the outbox,
and only after the commit does any of them hear 202. A database error fails the whole
batch, and then none of its votes was taken (each client hears 503 and may retry): a vote
is never lost and never doubled.

The batching is natural, not timed: an idle writer takes the first vote alone and adds no
wait, and under load the votes that arrive while one batch commits share the next. On
SQLite this turns one write lock, one commit and one outbox-bound query per vote into one
per batch; on PostgreSQL one round trip per statement per vote into one per batch. Since
the batch's counts are read in its own transaction, the vote limit is exact: concurrent
votes of one user can no longer slip past it together.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future

from kaizen.core import metrics
from kaizen.core.events import PreferenceEvent
from kaizen.core.settings import Settings
from services.comparisons import ComparisonStore, DatabaseUnavailable, VoteLimit, VoteRequest

log = logging.getLogger(__name__)

_Pending = tuple[VoteRequest, "Future[PreferenceEvent]"]


class WriterStopped(Exception):
    """The API is shutting down: the vote was not taken."""


class VoteWriter:
    """Owns the writer thread: `submit` from the event loop, `stop` (commits what was queued, then
    refuses)."""

    def __init__(self, settings: Settings, store: ComparisonStore) -> None:
        self.store = store
        self.batch_max = settings.vote_batch_max
        self.limit = VoteLimit(settings.vote_limit_per_window, settings.vote_limit_window)
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Commit the votes already queued, then end the thread; later submits are refused."""
        with self._lock:
            self._closed = True
            self._queue.put(None)  # after every vote queued so far (submit queues under the lock)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._fail_queued(WriterStopped("the API is shutting down; the vote was not taken"))

    def submit(self, vote: VoteRequest) -> asyncio.Future[PreferenceEvent]:
        """Queue one vote; the awaitable gives its event or raises its refusal (`VoteLimited`,
        `VoteError`, `OutboxFull`) or the batch's failure (`DatabaseUnavailable`, `WriterStopped`).
        The first vote starts the thread (an app that never takes one never starts it)."""
        fut: Future[PreferenceEvent] = Future()
        with self._lock:
            if self._closed:
                fut.set_exception(WriterStopped("the API is shutting down; the vote was not taken"))
            else:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="vote-writer", daemon=True)
                    self._thread.start()
                self._queue.put((vote, fut))
        return asyncio.wrap_future(fut)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[_Pending] = []
            item = self._queue.get()  # wait for the first vote, then take what else is waiting
            while item is not None:
                batch.append(item)
                if len(batch) == self.batch_max:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            stopping = item is None  # `stop` queued its marker: commit this batch, then end
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        metrics.VOTE_BATCH_SIZE.observe(len(batch))
        try:
            results = self.store.vote_many([vote for vote, _ in batch], self.limit)
        except Exception as exc:  # noqa: BLE001 - the thread must live on; each vote hears the failure
            if not isinstance(exc, DatabaseUnavailable):
                log.exception("a batch of %d votes failed", len(batch))
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    def _fail_queued(self, exc: Exception) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].set_exception(exc)
