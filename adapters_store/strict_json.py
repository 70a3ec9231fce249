"""JSON parsing that refuses what ``json.loads`` silently accepts.

Python's ``json`` keeps the last of duplicated keys and accepts ``NaN``/``Infinity``. A manifest or a
safetensors header with duplicated keys may mean different things to different readers (this parser,
pydantic's, the Rust safetensors one), which is how validation gets bypassed, so both are refused.
"""

from __future__ import annotations

import json
from typing import Any


class StrictJSONError(ValueError):
    """The text is not strict JSON; the message says why."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise StrictJSONError(f"duplicated key {key!r}")
        obj[key] = value
    return obj


def _refuse_constant(name: str) -> Any:
    raise StrictJSONError(f"non-standard JSON constant {name}")


def loads_strict(data: bytes | str) -> Any:
    """Parse JSON, refusing duplicated object keys, NaN/Infinity and invalid UTF-8."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StrictJSONError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    else:
        text = data
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)
    except StrictJSONError:
        raise
    except json.JSONDecodeError as exc:
        raise StrictJSONError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise StrictJSONError("JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise StrictJSONError(f"not acceptable JSON ({exc})") from None
