"""The messages between front ends and engines: msgpack maps over ZeroMQ, never pickle.

A message is a msgpack map with a string `op` (requests) or `ok` (replies) and plain values only: str,
int, float, bool, None, bytes, lists and maps with string keys. Decoding refuses msgpack extension types
and anything that is not such a map, so a crafted message can at worst be refused: nothing in it names
code to run (pickle, which multiprocessing's Queue and Pipe use, would run any callable it names).

Replies: `{"ok": True, ...values}` or `{"ok": False, "error": {"kind", "message", "details"}}`; `kind`
names one of a fixed table of exception types on the receiving side (`server.wire_errors`), never a
class looked up by name.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import msgpack

Message = dict[str, Any]


class BadMessage(Exception):
    """Bytes on the channel that are not one of the project's messages."""


def _refuse_ext(code: int, data: bytes) -> object:
    raise BadMessage(f"msgpack extension type {code} is not allowed on the channel")


def encode(message: Message) -> bytes:
    """A message as msgpack bytes; only plain values can be encoded (anything else raises TypeError)."""
    return msgpack.packb(message, use_bin_type=True, strict_types=False)  # type: ignore[no-any-return]


def decode(data: bytes, *, max_bytes: int = 1 << 30) -> Message:
    """One message from msgpack bytes; BadMessage for anything but a map with string keys."""
    if len(data) > max_bytes:
        raise BadMessage(f"message of {len(data)} bytes exceeds {max_bytes}")
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext, use_list=True)
    except BadMessage:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise BadMessage(f"not a msgpack message: {exc}") from None
    if not isinstance(value, dict) or not ("op" in value or "ok" in value):
        raise BadMessage("a message is a map with an 'op' (request) or 'ok' (reply) field")
    return value


def ok(**values: Any) -> Message:
    return {"ok": True, **values}


def failure(kind: str, message: str, **details: Any) -> Message:
    return {"ok": False, "error": {"kind": kind, "message": message, "details": details}}


def affinity(domain: str, engines: int) -> int:
    """The engine that serves `domain`: rendezvous hashing (the engine with the highest hash of
    domain@engine), so every front-end process agrees (not Python's salted hash()) and a change in the
    number of engines moves only the domains of the engines added or removed."""
    return max(
        range(engines), key=lambda i: hashlib.blake2b(f"{domain}@{i}".encode(), digest_size=8).digest()
    )


def announce(event: str) -> None:
    """One `md-event ...` line on stdout for the supervisor's watchers (tests, operators), written with
    one write() so the lines of several processes sharing the pipe never interleave (print() may split a
    line from its newline)."""
    os.write(1, f"md-event {event}\n".encode())
