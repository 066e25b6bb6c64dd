"""The web dashboard: one self-contained page (no build step, no outside assets) that calls the public API."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["dashboard"])


@cache
def _page() -> str:
    return resources.files("app.web").joinpath("dashboard.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    # The page holds no data: everything it shows comes from API calls made with the user's key.
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache",
                                          "Content-Security-Policy": "default-src 'self'; style-src 'self' "
                                          "'unsafe-inline'; script-src 'self' 'unsafe-inline'; img-src 'self' data:"})
