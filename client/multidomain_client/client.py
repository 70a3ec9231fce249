"""A small Python client for the server's API (httpx; imports nothing of the server or torch).

    client = MultidomainClient("http://127.0.0.1:8000", token="admin-secret")
    client.upload("birds", manifest_bytes, tensor_bytes, activate=True)   # {"domain", "version", "active"}
    client.classify("birds", open("crow.jpg", "rb").read(), top_k=3)      # {"domain", "version", "results", ...}

Every error answer becomes a `ServerResponseError` subclass carrying the HTTP status, the server's error
code and message and its details (e.g. the validator's `problems`); its text names them all, so a printed
exception tells a person why the server refused.

Requests that are safe to repeat (classify and reads) that get 429 or 503 (queue full, engine restarting)
are retried after the answer's `Retry-After` (1 s without one), at most `retries` times and `max_wait_s`
seconds of waiting in all; then the `Overloaded` error is raised. Uploads and store changes are never
repeated: a 503 there may come after the change was made.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import httpx


class ClientError(Exception):
    """Base class of the client's errors."""


class ServerUnreachable(ClientError):
    """The server could not be reached (connection refused, timeout...)."""


_PROBLEMS_SHOWN = 10
"""Most problems a message lists (an upload with a wrong backbone can have one per tensor)."""


class ServerResponseError(ClientError):
    """The server answered with an error; ``str()`` is the status, code, message and every reason given."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        super().__init__(self._text())

    def _text(self) -> str:
        text = f"{self.status} {self.code}: {self.message}"
        problems = self.details.get("problems")
        if isinstance(problems, list) and problems:
            reasons = [_reason(p) for p in problems[:_PROBLEMS_SHOWN]]
            if len(problems) > _PROBLEMS_SHOWN:
                reasons.append(f"and {len(problems) - _PROBLEMS_SHOWN} more")
            text += ": " + "; ".join(reasons)
        return text


def _reason(problem: Any) -> str:
    """One problem of an error body (``{"field", "message", "code"}``) as ``field: message``."""
    if not isinstance(problem, dict):
        return str(problem)
    field, message = problem.get("field"), problem.get("message")
    return f"{field}: {message}" if field else str(message)


class AuthError(ServerResponseError):
    """401/403: a missing or wrong token."""


class NotFound(ServerResponseError):
    """404: unknown domain, version or route."""


class InvalidArtifact(ServerResponseError):
    """422 on upload: `problems` lists every reason the validator found."""

    @property
    def problems(self) -> list[dict[str, str]]:
        return list(self.details.get("problems", []))


class Overloaded(ServerResponseError):
    """429/503: retry after `retry_after` seconds."""

    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


def _error_for(response: httpx.Response) -> ServerResponseError:
    try:
        error = response.json()["error"]
        code, message = str(error.pop("code")), str(error.pop("message"))
        details: dict[str, Any] = error
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message, details = "http_error", response.text[:500] or response.reason_phrase, {}
    status = response.status_code
    args = (status, code, message, details)
    if status in (401, 403):
        return AuthError(*args)
    if status == 404:
        return NotFound(*args)
    if status == 422 and code == "invalid_artifact":
        return InvalidArtifact(*args)
    if status in (429, 503):
        retry = response.headers.get("retry-after")
        return Overloaded(*args, retry_after=float(retry) if retry and retry.isdigit() else None)
    return ServerResponseError(*args)


class MultidomainClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        retries: int = 3,
        max_wait_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`retries`: how often a classify or read answered 429/503 is repeated; `max_wait_s`: the most
        seconds spent waiting for those retries in all; `sleep`: how to wait (tests record the waits)."""
        if retries < 0 or max_wait_s < 0:
            raise ValueError("retries and max_wait_s must not be negative")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)
        self.retries = retries
        self.max_wait_s = max_wait_s
        self._sleep = sleep

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MultidomainClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _request(self, method: str, url: str, *, repeatable: bool = False, **kwargs: Any) -> Any:
        """One request; `repeatable` ones are retried on 429/503 after Retry-After, within the bounds."""
        waited = 0.0
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                raise ServerUnreachable(f"{method} {url}: {exc}") from exc
            if response.status_code < 400:
                return response.json()
            error = _error_for(response)
            if not (repeatable and isinstance(error, Overloaded)) or attempt == self.retries:
                raise error
            wait = error.retry_after if error.retry_after is not None else 1.0
            if waited + wait > self.max_wait_s:
                raise error
            self._sleep(wait)
            waited += wait
        raise AssertionError("unreachable")  # the loop returns or raises

    # -- inference --------------------------------------------------------------------------------
    def classify(self, domain: str, images: bytes | Sequence[bytes], *, top_k: int = 5) -> dict[str, Any]:
        """Classify one image (raw bytes) or several (multipart) in `domain`."""
        params = {"top_k": top_k}
        if isinstance(images, bytes):
            headers = {"Content-Type": "application/octet-stream", "X-Domain": domain}
            return self._request(  # type: ignore[no-any-return]
                "POST", "/v1/classify", repeatable=True, content=images, headers=headers, params=params
            )
        files = [("file", (f"image{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
        return self._request(  # type: ignore[no-any-return]
            "POST", "/v1/classify", repeatable=True, files=files, headers={"X-Domain": domain}, params=params
        )

    # -- domains ----------------------------------------------------------------------------------
    def list_domains(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/domains", repeatable=True)["domains"]  # type: ignore[no-any-return]

    def describe(self, domain: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/domains/{domain}", repeatable=True)  # type: ignore[no-any-return]

    def upload(
        self, domain: str, manifest_bytes: bytes, tensor_bytes: bytes, activate: bool = True
    ) -> dict[str, Any]:
        """Upload a new version of `domain`; returns {"domain", "version", "active"}."""
        files = {
            "manifest": ("manifest.json", manifest_bytes, "application/json"),
            "tensors": ("adapter.safetensors", tensor_bytes, "application/octet-stream"),
        }
        params = {"activate": "true" if activate else "false"}
        return self._request("POST", f"/v1/domains/{domain}/adapters", files=files, params=params)  # type: ignore[no-any-return]

    def upload_bundle(self, domain: str, bundle: bytes, activate: bool = True) -> dict[str, Any]:
        headers = {"Content-Type": "application/x-tar"}
        params = {"activate": "true" if activate else "false"}
        return self._request(  # type: ignore[no-any-return]
            "POST", f"/v1/domains/{domain}/adapters", content=bundle, headers=headers, params=params
        )

    def activate(self, domain: str, version: int) -> int:
        return int(self._request("PUT", f"/v1/domains/{domain}/active", json={"version": version})["active"])

    def rollback(self, domain: str) -> int:
        return int(self._request("PUT", f"/v1/domains/{domain}/active", json={"rollback": True})["active"])

    def delete(self, domain: str, version: int | None = None) -> None:
        url = f"/v1/domains/{domain}" if version is None else f"/v1/domains/{domain}/versions/{version}"
        self._request("DELETE", url)

    def ready(self) -> dict[str, Any]:
        return self._request("GET", "/readyz")  # type: ignore[no-any-return]
