"""Route dependencies: who is calling (API key, rate limit), the admin token, the serving rollout.

Each is a named `Annotated` alias (cf. full-stack-fastapi-template `api/deps.py`): `CallerDep`,
`AdminDep`, `RolloutDep`. Failed authentications are counted per client address, and an address
past its limit is refused before its credentials are even checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from services.api.errors import REGISTRY_DAMAGED, APIError
from services.auth import AuthError, bearer, check_admin, check_api_key, retry_after, user_id
from services.rollout import Rollout


@dataclass(frozen=True)
class Caller:
    """Who sent the request: a pseudonymous id, never the key."""

    user: str


async def get_rollout(request: Request) -> Rollout:
    if getattr(request.app.state, "registry_damaged", False):
        raise APIError(503, REGISTRY_DAMAGED, type="service_unavailable", code="registry_damaged")
    rollout: Rollout | None = getattr(request.app.state, "rollout", None)
    if rollout is None or not rollout.ready:
        raise APIError(503, "the model is still loading", type="service_unavailable", code="loading")
    return rollout


def client_address(request: Request) -> str:
    """Who failed to authenticate: the peer's address (a trusted proxy's X-Forwarded-For, per uvicorn)."""
    return request.client.host if request.client else "unknown"


def refuse_after_auth_failures(request: Request) -> None:
    """429 for an address past its failed-authentication limit, before its credentials are checked."""
    wait = request.app.state.auth_failures.wait(client_address(request))
    if wait > 0:
        raise APIError(429, f"too many failed authentications from this address: retry in {wait:.0f} s",
                       type="rate_limit_error", code="too_many_auth_failures",
                       headers={"Retry-After": retry_after(wait)})


def count_auth_failure(request: Request) -> None:
    """A wrong key or token was presented (a missing one guesses nothing, so it is not counted)."""
    token = bearer(request.headers.get("authorization"))
    if token is not None:
        request.app.state.auth_failures.failed(client_address(request), token)


async def get_caller(request: Request) -> Caller:
    """Authenticate the key (if keys are configured) and take a rate-limit token.

    Async on purpose, like the other dependencies: FastAPI runs a plain `def`
    dependency in a worker thread, a hop that cost more than the check itself."""
    state = request.app.state
    refuse_after_auth_failures(request)
    try:
        key = check_api_key(state.settings, request.headers.get("authorization"))
    except AuthError as exc:
        count_auth_failure(request)
        raise APIError(exc.status, exc.message, type="authentication_error", code=exc.code) from None
    caller = Caller(user=user_id(state.user_secret, key))
    wait = state.limiter.acquire(caller.user)
    if wait > 0:
        raise APIError(429, f"rate limit exceeded: retry in {wait:.1f} s", type="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": retry_after(wait)})
    return caller


async def require_admin(request: Request) -> None:
    refuse_after_auth_failures(request)
    try:
        check_admin(request.app.state.admin_token, request.headers.get("authorization"))
    except AuthError as exc:
        count_auth_failure(request)
        type_ = "authentication_error" if exc.status == 401 else "permission_error"
        raise APIError(exc.status, exc.message, type=type_, code=exc.code) from None


RolloutDep = Annotated[Rollout, Depends(get_rollout)]
CallerDep = Annotated[Caller, Depends(get_caller)]
AdminDep = Annotated[None, Depends(require_admin)]
