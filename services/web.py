"""The web pages: the chat page at `/` and the operator page at `/admin`.

Plain HTML/CSS/JS served from services/static/ by the chat API itself: no
build step and no external CDN, since many deployments are offline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def chat_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/admin")
async def admin_page() -> FileResponse:
    """The operator page. The page itself is public (no secrets in it); everything it
    shows comes from the `/admin/*` JSON routes, which need the admin token."""
    return FileResponse(STATIC_DIR / "admin.html", headers={"Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)
