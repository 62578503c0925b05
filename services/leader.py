"""One decider among API replicas: a lease row in the shared store.

    lease = Lease(store, "rollout", ttl_s=15)
    if lease.hold():            # acquired or renewed: this replica decides
        lease.publish({...})    # what it decided, for every replica's /admin/rollout

Every replica calls `hold()` on each registry poll; the holder renews, the
others see a live lease and only follow the registry. A holder that stops
renewing (killed, partitioned from the database) loses the lease after `ttl_s`
and the next replica to poll takes it. The same table and statements work on
SQLite (one process: it always holds) and PostgreSQL (the row is locked while
it is read and written, so two replicas cannot both take it).

A lease alone cannot fence a holder that stalls past its expiry and then acts;
decisions are therefore also compare-and-set on the registry's generation
(kaizen/core/registry.py, `expect`): a decision applies only to the exact state it
judged, so a stale holder's decision is refused, never applied twice or against
a newer state. Expiry uses wall-clock time of the replicas (NTP-synchronised
pods; the TTL is seconds, clock skew is milliseconds).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from sqlalchemy import exc, insert, select, update

from services import db
from services.comparisons import ComparisonStore

log = logging.getLogger(__name__)


def default_holder() -> str:
    """Who this process is, for the lease row and the operator page: host (the pod name), pid, random."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Lease:
    """A named, expiring lease held by at most one process of those sharing a store."""

    def __init__(self, store: ComparisonStore, name: str, ttl_s: float, holder: str | None = None) -> None:
        self.store, self.name, self.ttl_s = store, name, ttl_s
        self.holder = holder or default_holder()
        self.held = False

    def hold(self) -> bool:
        """Acquire the lease if free or expired, renew it if ours; True while this process holds it."""
        now = time.time()
        t = db.leases
        try:
            with self.store.transaction() as conn:
                row: Any = conn.execute(select(t.c.holder, t.c.expires_at).where(t.c.name == self.name)
                                        .with_for_update()).one_or_none()
                if row is None:
                    conn.execute(insert(t).values(name=self.name, holder=self.holder,
                                                  expires_at=now + self.ttl_s, updated_at=now))
                elif row.holder == self.holder or row.expires_at < now:
                    conn.execute(update(t).where(t.c.name == self.name).values(
                        holder=self.holder, expires_at=now + self.ttl_s,
                        **({} if row.holder == self.holder else {"info": None}), updated_at=now))
                else:
                    self._set(False)
                    return False
        except exc.IntegrityError:  # another replica inserted the first row at the same moment
            self._set(False)
            return False
        self._set(True)
        return True

    def _set(self, held: bool) -> None:
        if held != self.held:
            log.info("%s lease %s by %s", self.name, "taken" if held else "not held", self.holder)
        self.held = held

    def publish(self, info: dict[str, Any]) -> None:
        """Store what the holder decided (ignored if the lease has passed to another)."""
        t = db.leases
        with self.store.transaction() as conn:
            conn.execute(update(t).where(t.c.name == self.name, t.c.holder == self.holder)
                         .values(info=json.dumps(info), updated_at=time.time()))

    def read(self) -> dict[str, Any]:
        """{"holder", "expires_in_s", "info"} of the lease; holder None if nobody holds it."""
        t = db.leases
        with self.store.transaction() as conn:
            row: Any = conn.execute(select(t.c.holder, t.c.expires_at, t.c.info)
                                    .where(t.c.name == self.name)).one_or_none()
        if row is None:
            return {"holder": None, "expires_in_s": None, "info": None}
        left = row.expires_at - time.time()
        return {"holder": row.holder if left > 0 else None, "expires_in_s": round(left, 1),
                "info": json.loads(row.info) if row.info else None}

    def release(self) -> None:
        """Give the lease up now (a clean shutdown), so another replica takes over at its next poll."""
        if not self.held:
            return
        t = db.leases
        try:
            with self.store.transaction() as conn:
                conn.execute(update(t).where(t.c.name == self.name, t.c.holder == self.holder)
                             .values(expires_at=0.0, updated_at=time.time()))
        except db.DatabaseUnavailable as e:
            log.warning("could not release the %s lease (%s); it expires by itself", self.name, e)
        self.held = False
