"""FastAPI dependencies: the app's runtime and the token checks.

All `async def`: FastAPI runs plain `def` dependencies in its thread pool, a thread hop per dependency
per request for what is a dictionary lookup and a string comparison.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.auth import check_token
from server.errors import NotReady
from server.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("the server is starting: the backbone is not loaded yet")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def require_admin(request: Request, runtime: RuntimeDep) -> None:
    check_token(request, runtime.settings.admin_token, what="admin", required=True)


async def require_inference(request: Request, runtime: RuntimeDep) -> None:
    check_token(request, runtime.settings.inference_token, what="inference", required=False)
