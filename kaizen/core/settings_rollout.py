"""Settings of the rollout: the model registry, the canary (its share of users, the votes and the
health numbers that decide it), and weight swaps' drain.

Field group only: kaizen/core/settings.py's `Settings` inherits it with the others, and is the one
class Kaizen reads settings through (`get_settings()`); the environment names are `KAIZEN_` + the
field name in capitals.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings


class RolloutSettings(BaseSettings):
    """The registry the chat API follows and the canary it runs (services/rollout.py)."""

    # -- registry and rollout ------------------------------------------------------
    registry_dir: Path | None = None
    """Model registry (versions, stages, audit log). Unset: `<data_dir>/registry`.
    In Kubernetes a shared volume seen by the chat API and the trainer."""
    registry_poll_interval_s: float = Field(default=5.0, gt=0)
    """How often the chat API re-reads the registry, in case it missed a model event."""
    auto_rollout: bool = True
    """Canary every published version and promote or roll back from live votes.
    Off: operators decide with `kaizen models canary|promote|rollback`."""
    canary_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    """Share of users an automatic canary is served to (sticky per user)."""
    canary_min_votes: int = Field(default=30, ge=1)
    """Counted champion-vs-canary votes needed before the votes decide, promotion and rollback
    alike (services/canary.py argues why the floor is the same both ways)."""
    # -- votes that decide a canary (#19 item 2: one key holder must not steer it; services/canary.py)
    canary_alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    """Chance, over all looks together, that the votes wrongly promote (canary not better) or wrongly
    roll back (canary not worse): the decision is re-checked every poll, so it uses an anytime-valid
    interval (a confidence sequence), not a fixed-n one."""
    canary_tuned_votes: int = Field(default=100, ge=1)
    """Vote count at which the anytime interval is nearly as narrow as it can be (the scale of its
    mixing prior); any value keeps it valid, it only moves power between early and late looks."""
    canary_min_users: int = Field(default=10, ge=1)
    """Distinct users whose votes are needed before the votes decide, either way."""
    canary_max_votes_per_user: int = Field(default=5, ge=1)
    """Votes of one user that count toward one canary's decision (their first); later ones are
    accepted and train reward models, but do not move the canary."""
    vote_limit_per_window: int = Field(default=120, ge=1)
    """Votes one user may cast per `vote_limit_window`; past it `POST /v1/feedback` answers 429
    until the oldest leaves the window."""
    vote_limit_window: timedelta = timedelta(hours=1)
    """Window of `vote_limit_per_window` (seconds or ISO 8601)."""
    canary_max_duration: timedelta = timedelta(hours=24)
    """An automatic canary with no decision after this long is rolled back."""
    canary_max_error_rate_increase: float = Field(default=0.05, ge=0.0, le=1.0)
    """Roll back when the canary's error rate exceeds the champion's by more."""
    canary_max_ttft_ratio: float = Field(default=3.0, ge=1.0)
    """Roll back when the canary's median time to first token exceeds the champion's by this factor
    (and by `canary_min_ttft_increase_s`)."""
    canary_min_ttft_increase_s: float = Field(default=0.25, ge=0.0)
    """...and by at least this many seconds: a few milliseconds more on a small model is noise
    (a freshly loaded engine's first answers, a busy machine), not a slower version."""
    canary_min_requests: int = Field(default=20, ge=1)
    """Requests per version before error rate and latency are compared at all."""
    canary_retire_drain_s: float = Field(default=60.0, ge=0)
    """A canary engine that is withdrawn or promoted takes no new requests; the answers it is
    still generating get this long to finish before the engine stops (the rest end with 503
    `engine_stopped`). Nobody waits on it, so it can be long: a pair answered half by the
    canary is not cut short on a busy machine."""
    swap_drain_timeout_s: float = Field(default=2.0, ge=0)
    """A weight swap first lets in-flight answers finish (so each comes from one version),
    for at most this long; the rest are frozen, resumed on the new weights and labelled
    `old+new`. Longer: fewer mixed answers, but new requests wait longer for the swap."""
