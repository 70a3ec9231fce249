"""FastAPI dependencies: the front end's state and the token checks.

All `async def`: FastAPI runs plain `def` dependencies in its thread pool, a thread hop per dependency
per request for what is a dictionary lookup and a string comparison.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.auth import check_token
from server.errors import NotReady
from server.frontend import FrontEnd


async def get_frontend(request: Request) -> FrontEnd:
    frontend: FrontEnd | None = getattr(request.app.state, "frontend", None)
    if frontend is None:
        raise NotReady("the server is starting: the backbone is not loaded yet")
    return frontend


FrontEndDep = Annotated[FrontEnd, Depends(get_frontend)]


async def require_admin(request: Request, frontend: FrontEndDep) -> None:
    check_token(request, frontend.settings.admin_token, what="admin", required=True)


async def require_inference(request: Request, frontend: FrontEndDep) -> None:
    check_token(request, frontend.settings.inference_token, what="inference", required=False)
