"""FastAPI dependencies: the app's runtime and the token checks."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.auth import check_token
from server.errors import NotReady
from server.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("the server is starting: the backbone is not loaded yet")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def require_admin(request: Request, runtime: RuntimeDep) -> None:
    check_token(request, runtime.settings.admin_token, what="admin", required=True)


def require_inference(request: Request, runtime: RuntimeDep) -> None:
    check_token(request, runtime.settings.inference_token, what="inference", required=False)
