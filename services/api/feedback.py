"""`POST /v1/feedback`: a vote on a paired answer, written to the durable outbox (services/outbox.py)
and relayed to Kafka as a Preference event.

Invalid bodies answer 422 here, not OpenAI's 400 (services/api/errors.py, UNPROCESSABLE_ROUTES).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kaizen.core import metrics
from services.api.deps import CallerDep
from services.api.errors import APIError
from services.auth import retry_after
from services.comparisons import OutboxFull, VoteError, VoteLimited, VoteRequest
from services.outbox import OutboxRelay
from services.protocol import FeedbackRequest, FeedbackResponse, dump
from services.vote_writer import VoteWriter, WriterStopped
from kaizen.core.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/feedback", status_code=202, response_model=FeedbackResponse)
async def feedback(body: FeedbackRequest, caller: CallerDep, request: Request) -> Response:
    """A vote on a paired answer: 0 or 1 (the better choice's index), "tie" or "both_bad"."""
    settings: Settings = request.app.state.settings
    writer: VoteWriter = request.app.state.vote_writer
    try:  # committed with the other votes waiting (services/vote_writer.py); 202 only after the commit
        event = await writer.submit(VoteRequest(body.comparison_id, caller.user, body.choice, body.reason))
    except VoteLimited as exc:  # per-user vote limit (#19 item 2), exact: counted in the vote's transaction
        raise APIError(429, f"vote limit reached: {settings.vote_limit_per_window} votes per "
                       f"{settings.vote_limit_window}; retry in {exc.wait_s:.0f} s", type="rate_limit_error",
                       code="vote_limit_exceeded", headers={"Retry-After": retry_after(exc.wait_s)}) from None
    except OutboxFull as exc:
        metrics.OUTBOX_FULL_REJECTIONS.inc()
        raise APIError(503, f"votes are not being delivered fast enough ({exc}): retry later",
                       type="overloaded_error", code="outbox_full", headers={"Retry-After": "5"}) from None
    except WriterStopped as exc:
        raise APIError(503, f"{exc}: retry", type="overloaded_error", code="shutting_down",
                       headers={"Retry-After": "1"}) from None
    except VoteError as exc:
        type_ = "not_found_error" if exc.status == 404 else (
            "permission_error" if exc.status == 403 else "invalid_request_error")
        raise APIError(exc.status, exc.message, type=type_, param="comparison_id", code=exc.code) from None
    metrics.VOTES.labels(choice=str(body.choice)).inc()
    request.app.state.rates.vote(str(body.choice))
    relay: OutboxRelay | None = getattr(request.app.state, "relay", None)
    if relay is not None:
        relay.notify()
    out = FeedbackResponse(event_id=str(event.event_id), comparison_id=body.comparison_id,
                           model_versions=[a.model_version for a in event.answers])
    return JSONResponse(dump(out), status_code=202)
