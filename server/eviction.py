"""Which resident domain leaves the adapter bank when a missing one must come in.

The bank cannot refuse a miss (the batch needs the domain resident to be served), so the policy only picks
the victim. The engine owns residency and recency (its resident table, oldest use first); a policy is told
the lookups and is given the candidates in that order.

- `lru`: the least recently used candidate. A run of one-off cold domains (a Zipf tail) pushes hot domains
  out, each to be loaded again at its next request.
- `lfu`: the candidate with the fewest recent requests, counted over every domain version seen, resident
  or not, and halved every `window` requests (LFU with aging; the history outside the bank is TinyLFU's
  idea, Einziger et al. 2017: a hot domain evicted once comes back with its count). A one-off cold domain
  then takes the slot of the last cold one instead of a hot one's; ties go to the least recently used.

Counted per request (image), not per batch: a domain with five images in a batch was asked for five times.
A dictionary rather than a count-min sketch: a store holds thousands of domains, not millions, and aging
drops the counts that fall below half a request, so it holds only the recently seen ones.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Generic, Literal, Protocol, TypeVar

Key = TypeVar("Key", bound=Hashable)

EvictionName = Literal["lru", "lfu"]


class EvictionPolicy(Protocol[Key]):
    def record(self, key: Key, requests: int) -> None:
        """`requests` requests for `key` arrived (hit or miss)."""

    def victim(self, candidates: Sequence[Key]) -> Key:
        """The one of `candidates` (resident, evictable, least recently used first; never empty) to evict."""


class LeastRecentlyUsed(Generic[Key]):
    def record(self, key: Key, requests: int) -> None:
        pass  # recency is the engine's resident order

    def victim(self, candidates: Sequence[Key]) -> Key:
        return candidates[0]


class LeastFrequentlyUsed(Generic[Key]):
    """LFU with aging over the history of every key seen (see the module's docstring)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 request, not {window}")
        self.window = window
        """Requests between two halvings of every count."""
        self.counts: dict[Key, float] = {}
        self._since_aging = 0

    def record(self, key: Key, requests: int) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + requests
        self._since_aging += requests
        while self._since_aging >= self.window:
            self._since_aging -= self.window
            self.counts = {k: c / 2 for k, c in self.counts.items() if c >= 1.0}

    def victim(self, candidates: Sequence[Key]) -> Key:
        # min() keeps the first of equal counts: the least recently used
        return min(candidates, key=lambda k: self.counts.get(k, 0.0))


def eviction_policy(name: EvictionName, bank_slots: int) -> EvictionPolicy[Key]:
    """The named policy for a bank of `bank_slots`. LFU ages every 10 x `bank_slots` requests (TinyLFU's
    sample size): long enough to rank the domains that fill the bank, short enough that a domain gone
    cold leaves it within a few windows."""
    if name == "lru":
        return LeastRecentlyUsed()
    if name == "lfu":
        return LeastFrequentlyUsed(window=10 * bank_slots)
    raise ValueError(f"unknown bank eviction policy {name!r} (lru or lfu)")
