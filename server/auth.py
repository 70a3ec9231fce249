"""Bearer-token checks: admin endpoints always need the admin token; inference only when one is set."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from server.errors import Forbidden, Unauthorized


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def check_token(request: Request, expected: SecretStr | None, *, what: str, required: bool) -> None:
    if expected is None:
        if required:
            raise Forbidden(
                f"{what} endpoints are disabled: the server has no token for them (set MD_ADMIN_TOKEN)"
            )
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized(f"{what} endpoints need 'Authorization: Bearer <token>'")
    # Constant-time comparison: the time taken says nothing about how much of the token matched.
    if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise Forbidden(f"the bearer token is not valid for {what} endpoints")
