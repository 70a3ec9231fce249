"""FastAPI dependencies: the front end's state, the token checks and the version path parameter.

All `async def`: FastAPI runs plain `def` dependencies in its thread pool, a thread hop per dependency
per request for what is a dictionary lookup and a string comparison.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from server.auth import check_token
from server.errors import NotReady
from server.frontend import FrontEnd
from server.schemas import MAX_VERSION


async def get_frontend(request: Request) -> FrontEnd:
    frontend: FrontEnd | None = getattr(request.app.state, "frontend", None)
    if frontend is None:
        raise NotReady("the server is starting: the backbone is not loaded yet")
    return frontend


FrontEndDep = Annotated[FrontEnd, Depends(get_frontend)]
VersionNumber = Annotated[int, Path(ge=1, le=MAX_VERSION, description="A stored version of the domain")]


async def require_admin(request: Request, frontend: FrontEndDep) -> None:
    check_token(request, frontend.settings.admin_token, what="admin", required=True)


async def require_inference(request: Request, frontend: FrontEndDep) -> None:
    check_token(request, frontend.settings.inference_token, what="inference", required=False)
