"""`/admin/*`: the operators' API (admin token): versions, rollout (canary, promote, rollback),
the audit log, training rounds and the trainer's schedule, request and vote rates.

The `kaizen models` commands and the operator page (`GET /admin`, services/web.py) call these.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Request

from services.api.deps import AdminDep, RolloutDep
from services.api.errors import APIError
from services.api.rates import Rates
from services.protocol import PromoteRequest, RollbackRequest, RolloutRequest
from kaizen.core.registry_schema import RegistryError
from services.rollout import Rollout
from kaizen.core.rounds_log import read_rounds
from kaizen.core.settings import Settings

router = APIRouter(prefix="/admin", tags=["admin"])

#: The trainer's round scheduler writes what decides the next round here (trainer/daemon.py, SCHEDULE_FILE).
SCHEDULE_PATH = ("rounds", "schedule.json")
#: A schedule report older than this means no trainer is checking (reports come every few seconds).
SCHEDULE_STALE_S = 60.0


def _registry_error(exc: RegistryError) -> APIError:
    type_ = "not_found_error" if exc.status == 404 else "invalid_request_error"
    return APIError(exc.status, str(exc), type=type_, code=exc.code)


def _version_row(rollout: Rollout, info: Any) -> dict[str, Any]:
    row: dict[str, Any] = info.model_dump(mode="json")
    row["serving"] = rollout.engine_named(info.version) is not None
    row["refused"] = rollout.refused.get(info.version)
    return row


@router.get("/versions")
async def admin_versions(_admin: AdminDep, rollout: RolloutDep) -> dict[str, Any]:
    """Every version in the registry with its stage, lineage parent, gate and training metrics."""
    state = await asyncio.to_thread(rollout.registry.state)
    infos = await asyncio.to_thread(rollout.registry.all_versions)
    return {"object": "list", "champion": state.champion, "canary": state.canary,
            "canary_fraction": state.canary_fraction,
            "data": [_version_row(rollout, i) for i in reversed(infos)]}


@router.get("/versions/{version}")
async def admin_version(version: str, _admin: AdminDep, rollout: RolloutDep) -> dict[str, Any]:
    try:
        info = await asyncio.to_thread(rollout.registry.info, version)
        lineage = await asyncio.to_thread(rollout.registry.lineage, version)
    except RegistryError as exc:
        raise _registry_error(exc) from None
    audit = await asyncio.to_thread(rollout.registry.audit, None, version)
    return {**_version_row(rollout, info), "lineage": lineage,
            "audit": [e.model_dump(mode="json") for e in audit]}


@router.get("/rollout")
async def admin_rollout(_admin: AdminDep, rollout: RolloutDep) -> dict[str, Any]:
    """Champion, canary and split; the live head-to-head with its 95% interval; health; decision."""
    return await asyncio.to_thread(rollout.status)


async def _act(rollout: Rollout, action: str, **kwargs: Any) -> dict[str, Any]:
    try:
        await rollout.act(action, **kwargs)
    except RegistryError as exc:
        raise _registry_error(exc) from None
    state = await rollout.reconcile()  # swap or start the canary before answering
    return await asyncio.to_thread(rollout.status, state)


@router.post("/rollout")
async def admin_start_canary(body: RolloutRequest, _admin: AdminDep, rollout: RolloutDep) -> dict[str, Any]:
    """Serve `version` to `fraction` of users (sticky per user) beside the champion."""
    return await _act(rollout, "canary", who=body.who, why=body.reason, version=body.version,
                      fraction=body.fraction)


@router.post("/promote")
async def admin_promote(body: PromoteRequest, _admin: AdminDep, rollout: RolloutDep) -> dict[str, Any]:
    """Make `version` (default: the canary) the champion; its weights are swapped in before this returns."""
    return await _act(rollout, "promote", who=body.who, why=body.reason, version=body.version)


@router.post("/rollback")
async def admin_rollback(body: RollbackRequest, _admin: AdminDep, rollout: RolloutDep) -> dict[str, Any]:
    """Withdraw the canary, or (with none) return to the previous champion."""
    return await _act(rollout, "rollback", who=body.who, why=body.reason)


@router.get("/audit")
async def admin_audit(_admin: AdminDep, rollout: RolloutDep, limit: int = 100) -> dict[str, Any]:
    entries = await asyncio.to_thread(rollout.registry.audit, max(1, min(limit, 10_000)))
    return {"object": "list", "data": [e.model_dump(mode="json") for e in reversed(entries)]}


@router.get("/rounds")
async def admin_rounds(_admin: AdminDep, request: Request, limit: int = 100) -> dict[str, Any]:
    """Training rounds as the trainer logged them (shared data dir), newest first."""
    settings: Settings = request.app.state.settings
    # the trainer's own data dir: under Helm the shared volume, not this pod's directory
    trainer_view = settings.model_copy(update={"data_dir": settings.trainer_data_path})
    rows = await asyncio.to_thread(read_rounds, trainer_view, max(1, min(limit, 10_000)))
    return {"object": "list", "data": rows}


@router.get("/schedule")
async def admin_schedule(_admin: AdminDep, request: Request) -> dict[str, Any]:
    """What starts the next training round, as the trainer's scheduler last saw it: votes so far,
    the thresholds, when the interval runs out. `trainer_reporting` is false when no trainer is checking."""
    settings: Settings = request.app.state.settings
    path = settings.trainer_data_path.joinpath(*SCHEDULE_PATH)
    try:
        report: dict[str, Any] = json.loads(await asyncio.to_thread(path.read_text))
    except (OSError, ValueError):
        return {"object": "schedule", "trainer_reporting": False,
                "min_new_preferences": settings.min_new_preferences,
                "round_interval_s": settings.round_interval.total_seconds()}
    age = time.time() - float(report.get("checked_at", 0))
    return {"object": "schedule", **report, "age_s": age, "trainer_reporting": age < SCHEDULE_STALE_S}


@router.get("/stats")
async def admin_stats(_admin: AdminDep, request: Request) -> dict[str, Any]:
    """Chat request and vote rates over the last few minutes, and votes by choice."""
    rates: Rates = request.app.state.rates
    return rates.snapshot()
