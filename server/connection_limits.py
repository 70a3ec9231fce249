"""One front end's limits on connections and buffered request bodies, and the accounting behind them.

`ConnectionLimits.for_frontend(settings)` is this process's share (K = `MD_WORKERS` front ends):

| setting | scope | this front end holds |
| --- | --- | --- |
| `MD_MAX_CONNECTIONS` | global | ceil(limit / K) connections (beyond: 503, closed) |
| `MD_MAX_CONNECTIONS_PER_ADDRESS` | per front end | that many per client address (beyond: 429, closed); K x that in the server |
| `MD_BODY_BUFFER_BYTES` | global | ceil(budget / K) bytes of request bodies (beyond: 503 `body_buffer_full`) |
| `MD_BODY_BUFFER_PER_ADDRESS_BYTES` | per front end | that many of them per client address (beyond: 503) |
| `MD_HEADER_TIMEOUT_S`, `MD_BODY_TIMEOUT_S`, `MD_KEEP_ALIVE_S` | per connection | the same |

The per-address limits are per front end because the kernel spreads one address's connections over the
K front ends by a hash of the 4-tuple: splitting them would refuse a client early whenever the hash is
uneven. The client address is the TCP peer, or, when the peer is a trusted proxy (`MD_TRUSTED_PROXIES`),
the last address of `X-Forwarded-For` that is not itself a trusted proxy; behind a balancer every
connection comes from it, so its connections are never refused, and the per-address limit counts each
forwarded client's requests in progress instead.

`ConnectionGuard` is the accounting (one per front-end process, touched only on its event loop): the HTTP
protocol (`server.http_protocol`) opens and closes connections and requests through it, the body
middleware (`server.middleware.BodyLimits`) reserves and releases body bytes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

# uvicorn's parser of trusted hosts (addresses, networks, "*") and of X-Forwarded-For (the last untrusted
# address): private, but this module already depends on uvicorn's protocol internals (pinned in
# pyproject), and it is the parser uvicorn itself trusts.
from uvicorn.middleware.proxy_headers import _TrustedHosts

from server.settings import Settings


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    keep_alive_s: float
    max_connections: int
    """This front end's share of `MD_MAX_CONNECTIONS`."""
    max_connections_per_address: int
    body_buffer_bytes: int
    """This front end's share of `MD_BODY_BUFFER_BYTES`."""
    body_buffer_per_address_bytes: int
    trusted_proxies: str

    @classmethod
    def for_frontend(cls, settings: Settings) -> ConnectionLimits:
        k = settings.frontends()
        limits = cls(
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            keep_alive_s=settings.keep_alive_s,
            max_connections=math.ceil(settings.max_connections / k),
            max_connections_per_address=settings.max_connections_per_address,
            body_buffer_bytes=math.ceil(settings.body_buffer_bytes / k),
            body_buffer_per_address_bytes=settings.body_buffer_per_address_bytes,
            trusted_proxies=settings.trusted_proxies,
        )
        # A classify body must fit the buffer whole, or that size could never be served.
        if min(limits.body_buffer_bytes, limits.body_buffer_per_address_bytes) < settings.max_body_bytes:
            raise ValueError(
                f"MD_BODY_BUFFER_BYTES / {k} front ends = {limits.body_buffer_bytes} and "
                f"MD_BODY_BUFFER_PER_ADDRESS_BYTES = {limits.body_buffer_per_address_bytes} must each be at "
                f"least MD_MAX_BODY_BYTES = {settings.max_body_bytes}"
            )
        return limits


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str


class ConnectionGuard:
    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.proxies = _TrustedHosts(limits.trusted_proxies) if limits.trusted_proxies.strip() else None
        self.connections = 0
        self.by_address: Counter[str] = Counter()
        """Connections per direct client address, and requests in progress per forwarded client."""
        self.body_bytes = 0
        self.body_bytes_by_address: Counter[str] = Counter()
        self.observe: Callable[[int, float], None] = lambda status, seconds: None
        """Called for every answer the protocol gives itself (408, and the refusals), with its status and
        the seconds since the connection or request began (the app sets it to its metrics)."""

    # -- addresses ---------------------------------------------------------------------------------------
    def is_trusted_proxy(self, host: str) -> bool:
        return self.proxies is not None and host in self.proxies

    def forwarded_client(self, peer: str, x_forwarded_for: str | None) -> str:
        """The client a trusted proxy's request is for (the peer itself when the header names none)."""
        if self.proxies is None or not x_forwarded_for:
            return peer
        host, _ = self.proxies.get_trusted_client_address(x_forwarded_for)
        return host or peer

    # -- connections and forwarded requests -----------------------------------------------------------
    def open_connection(self, peer: str, *, proxy: bool) -> Refusal | None:
        """Count a new connection from `peer`, or say why it is refused (then nothing is counted)."""
        if not proxy:
            if self.connections >= self.limits.max_connections:
                return Refusal(
                    503, "too_many_connections",
                    f"the server holds its limit of {self.limits.max_connections} connections",
                )  # fmt: skip
            refusal = self._per_address(peer, "connections")
            if refusal is not None:
                return refusal
            self.by_address[peer] += 1
        self.connections += 1
        return None

    def close_connection(self, peer: str, *, proxy: bool) -> None:
        self.connections -= 1
        if not proxy:
            self._release(self.by_address, peer, 1)

    def open_forwarded_request(self, client: str) -> Refusal | None:
        refusal = self._per_address(client, "requests in progress")
        if refusal is None:
            self.by_address[client] += 1
        return refusal

    def close_forwarded_request(self, client: str) -> None:
        self._release(self.by_address, client, 1)

    def _per_address(self, address: str, what: str) -> Refusal | None:
        limit = self.limits.max_connections_per_address
        if self.by_address[address] >= limit:
            return Refusal(
                429,
                "too_many_connections",
                f"{address} already has {limit} {what} here (MD_MAX_CONNECTIONS_PER_ADDRESS, per front end)",
            )
        return None

    # -- body bytes ----------------------------------------------------------------------------------------
    def reserve_body(self, address: str, nbytes: int) -> Refusal | None:
        """Reserve `nbytes` of body buffer for `address`, or say why not (then nothing is reserved)."""
        limits = self.limits
        if self.body_bytes_by_address[address] + nbytes > limits.body_buffer_per_address_bytes:
            return Refusal(
                503, "body_buffer_full",
                f"this client's request bodies would pass its share of the body buffer "
                f"({limits.body_buffer_per_address_bytes} bytes)",
            )  # fmt: skip
        if self.body_bytes + nbytes > limits.body_buffer_bytes:
            return Refusal(
                503, "body_buffer_full",
                f"the request bodies being received fill the body buffer ({limits.body_buffer_bytes} bytes)",
            )  # fmt: skip
        self.body_bytes += nbytes
        self.body_bytes_by_address[address] += nbytes
        return None

    def release_body(self, address: str, nbytes: int) -> None:
        self.body_bytes -= nbytes
        self._release(self.body_bytes_by_address, address, nbytes)

    @staticmethod
    def _release(counter: Counter[str], key: str, amount: int) -> None:
        counter[key] -= amount
        if counter[key] <= 0:  # no key per address that ever connected
            del counter[key]
