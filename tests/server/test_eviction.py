"""The bank's eviction policies alone (server/eviction.py); the engine's use of them is in test_engine.py."""

from __future__ import annotations

import pytest

from server.eviction import LeastFrequentlyUsed, LeastRecentlyUsed, eviction_policy


def test_lru_evicts_the_oldest_candidate() -> None:
    policy: LeastRecentlyUsed[str] = LeastRecentlyUsed()
    policy.record("a", 100)
    assert policy.victim(["a", "b", "c"]) == "a"  # recency is the order given, counts do not matter


def test_lfu_evicts_the_fewest_requests_and_breaks_ties_by_recency() -> None:
    policy: LeastFrequentlyUsed[str] = LeastFrequentlyUsed(window=1000)
    for key, n in [("hot", 5), ("warm", 2), ("cold", 1), ("cold2", 1)]:
        policy.record(key, n)
    assert policy.victim(["hot", "warm", "cold"]) == "cold"
    assert policy.victim(["cold2", "cold"]) == "cold2"  # equal counts: the first, least recently used
    assert policy.victim(["hot", "never-seen"]) == "never-seen"


def test_lfu_remembers_keys_outside_the_bank() -> None:
    """A hot key evicted once (for a batch that needed every slot) comes back with its count, so the next
    cold key does not push it out again."""
    policy: LeastFrequentlyUsed[str] = LeastFrequentlyUsed(window=1000)
    policy.record("hot", 10)
    policy.record("cold", 1)
    assert policy.victim(["hot", "cold"]) == "cold"
    assert policy.counts["hot"] == 10  # nothing is forgotten on eviction


def test_lfu_ages_counts_every_window() -> None:
    policy: LeastFrequentlyUsed[str] = LeastFrequentlyUsed(window=10)
    policy.record("old", 8)
    policy.record("new", 1)  # 9 requests: no aging yet
    assert policy.counts == {"old": 8, "new": 1}
    policy.record("new", 1)  # the 10th: every count halved, "new" at 1.0 kept
    assert policy.counts == {"old": 4, "new": 1}
    policy.record("new", 10)  # one more window: halved again
    assert policy.counts == {"old": 2, "new": 5.5}
    # A domain no longer asked for loses to one that is: the old hot one leaves the bank in time.
    policy.record("new", 20)  # two windows at once: halved twice
    assert policy.counts["old"] == 0.5 and policy.victim(["new", "old"]) == "old"
    policy.record("new", 10)
    assert "old" not in policy.counts  # below half a request: forgotten, so the table stays small


def test_policy_by_name() -> None:
    assert isinstance(eviction_policy("lru", 16), LeastRecentlyUsed)
    lfu = eviction_policy("lfu", 16)
    assert isinstance(lfu, LeastFrequentlyUsed) and lfu.window == 160
    with pytest.raises(ValueError, match="unknown bank eviction policy 'fifo'"):
        eviction_policy("fifo", 16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window must be at least 1"):
        LeastFrequentlyUsed(window=0)
