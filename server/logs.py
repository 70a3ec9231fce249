"""Request IDs and the log format: every log line of a request names its ID, front end and engine alike.

The ID comes from the request's `X-Request-Id` (checked: 1 to 128 characters of `[A-Za-z0-9._:~+/=-]`,
what UUIDs, W3C trace IDs and load balancers' IDs use; anything else is refused with 400) or is
generated, is echoed in the response, and lives in a context variable for the request's task. The
front end's `EngineClient` puts it into every message to an engine, which sets the same variable while
it answers. A log record factory copies the variable into every record (`record.request_id`, "-" when
there is none), whatever logger made it: uvicorn's, the server's, a library's.

`MD_LOG_JSON=1` prints one JSON object per line (time, level, logger, process, request_id, message).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from datetime import UTC, datetime

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128
_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:~+/=-]{{1,{MAX_REQUEST_ID}}}")

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class BadRequestId(ValueError):
    """An `X-Request-Id` header that is too long or holds characters a log line should not carry."""


def current_request_id() -> str | None:
    return _current.get()


def set_request_id(request_id: str | None) -> contextvars.Token[str | None]:
    return _current.set(request_id)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _current.reset(token)


def request_id_from(header: bytes | None) -> str:
    """The client's request ID (validated), or a new one."""
    if header is None:
        return uuid.uuid4().hex
    value = header.decode("latin-1")
    if not _REQUEST_ID.fullmatch(value):
        raise BadRequestId(
            f"X-Request-Id must be 1 to {MAX_REQUEST_ID} characters of letters, digits and ._:~+/=- "
            f"(got {len(value)} characters)"
        )
    return value


def install_record_factory() -> None:
    """Stamp every log record with the current request ID (idempotent)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "stamps_request_id", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)  # type: ignore[arg-type]
        record.request_id = _current.get() or "-"
        return record

    factory.stamps_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class JsonLines(logging.Formatter):
    """One JSON object per record. Written here rather than taken from a library: it is these few lines,
    and the front ends should not grow a dependency for them."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "component": self.component,
            "pid": record.process,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(component: str, level: str = "info", *, json_lines: bool = False) -> None:
    """The process's one log handler (stderr), text or JSON lines, every line with its request ID."""
    install_record_factory()
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonLines(component))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(levelname)s {component} [%(request_id)s] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
