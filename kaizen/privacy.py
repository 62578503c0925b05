"""Erasing one user's data: `kaizen prefs erase --user <api key or pseudonym>`.

Kaizen never stores an API key. Downstream a caller is a pseudonym, `u-` and 24 hex digits
of an HMAC of their key under the user-id secret (services/auth.py). A user's data lives in:

- the API's store (SQLite in the data dir, or the shared PostgreSQL): the comparisons served to
  them (full prompts and answers) and their votes in the outbox, delivered or not;
- the trainer's preference store (what reward models train on);
- the preferences topic and, for a malformed event, the dead-letter topic, until the topics'
  `retention.ms` (`topic_retention`, `dlq_retention`): a Kafka log cannot delete one record.

`erase` deletes what is reachable from this machine's settings and says where each place
stands. The trainer's store remembers the erasure, so the user's earlier votes are not stored
again if Kafka delivers them again. Model versions and reward models already trained on the
votes are not retrained; retention (README, "Data retention") bounds how long votes stay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from services.auth import ANONYMOUS, user_id
from kaizen.core.settings import Settings

PSEUDONYM = re.compile(r"u-[0-9a-f]{24}")


class EraseError(ValueError):
    """The user cannot be named from here (no secret, the shared anonymous id)."""


def pseudonym(settings: Settings, who: str) -> str:
    """The pseudonym for `who`: itself if it is one, else the HMAC of an API key under the
    secret the API uses (KAIZEN_USER_ID_SECRET, or <data_dir>/user-id.secret)."""
    who = who.strip()
    if who == ANONYMOUS:
        raise EraseError(f"{ANONYMOUS!r} is every caller of an open (keyless) server, not one user; "
                         "its data goes by retention (README, \"Data retention\")")
    if PSEUDONYM.fullmatch(who):
        return who
    if settings.user_id_secret is not None:
        secret = settings.user_id_secret.get_secret_value().encode()
    else:
        path = settings.data_dir / "user-id.secret"
        if not path.exists():
            raise EraseError(f"no user-id secret here (KAIZEN_USER_ID_SECRET unset, no {path}): "
                             "run this where the API runs, or pass the user's pseudonym (u-...)")
        secret = path.read_text().strip().encode()
    return user_id(secret, who)


@dataclass
class Erasure:
    """What `erase` did, place by place (printed by the CLI as JSON)."""

    user: str
    deleted: dict[str, int] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)
    remaining: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"user": self.user, "deleted": self.deleted, "unreachable": self.unreachable,
                "remaining": self.remaining}


def erase(settings: Settings, user: str) -> Erasure:
    """Delete `user`'s (a pseudonym's) data from every store these settings reach."""
    from services.comparisons import ComparisonStore, DatabaseUnavailable
    from trainer.store import PreferenceStore

    done = Erasure(user)
    try:
        comparisons = ComparisonStore.from_settings(settings)
    except DatabaseUnavailable as exc:
        done.unreachable["api_store"] = str(exc)
    else:
        try:
            done.deleted.update(comparisons.erase_user(user))
        finally:
            comparisons.close()
    if settings.preferences_db.exists():
        store = PreferenceStore(settings.preferences_db)
        try:
            done.deleted["preferences"] = store.erase_user(user)
        finally:
            store.close()
    else:
        done.unreachable["preference_store"] = (
            f"no {settings.preferences_db} on this machine: run this again where the trainer runs")
    done.remaining.append(
        f"Kafka topics {settings.topic_preferences} and {settings.topic_preferences_dlq}: records age out "
        f"after their retention.ms (Kaizen creates them with {settings.topic_retention} and "
        f"{settings.dlq_retention}); the trainer will not store this user's earlier votes again")
    return done
