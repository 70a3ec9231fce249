"""`GET /`: one small page to try the server with (pick a domain, classify an image; upload a bundle).

A single file shipped in the package (`server/static/index.html`): no dependency, no CDN, no build step.
It talks to /v1 with `fetch`; its content security policy allows nothing but this origin and its own
inline script and style.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["page"])

_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@cache
def _page() -> str:
    return (files("server") / "static" / "index.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Content-Security-Policy": _POLICY})
