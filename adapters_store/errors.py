"""Exception types of the artifact store.

The HTTP layer maps these to status codes in one place, so every failure the store or the
validator can produce is one of these types (never a bare ValueError or OSError):

- ``ArtifactInvalid``  -> 400/422: the uploaded bytes are refused; carries every ``Problem`` found.
- ``DomainNotFound`` / ``VersionNotFound`` / ``BackboneNotFound`` -> 404.
- ``StoreConflict``    -> 409: the request contradicts the store's state (delete the active version...).
- ``StoreBusy``        -> 503: another writer held the store's lock for longer than the timeout.
- ``StoreUnavailable`` -> 503: the store's backend (an S3 endpoint) could not be reached or refused.
- ``StoreCorrupt``     -> 500: the store's own files do not parse; an operator must look.
- ``StoreQuotaExceeded`` -> 409: the write would pass a quota (domains, versions per domain, bytes).
- ``StoreSymlink``     -> 500: a symbolic link inside the store's tree; refused, never followed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One reason an artifact is refused."""

    field: str
    """What is at fault: ``manifest.<field>``, ``tensors`` (the file), ``tensors.header``,
    ``tensors[<name>]`` (one tensor) or ``bundle``."""
    message: str
    """Why, in words an uploader can act on."""
    code: str = "invalid"
    """A stable machine-readable tag (``checksum``, ``nonfinite``, ``shape``...) for clients and tests."""

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class AdapterStoreError(Exception):
    """Base class of every error raised by ``adapters_store``."""


class ArtifactInvalid(AdapterStoreError):
    """An artifact (manifest, tensor file or bundle) is refused; ``problems`` lists every reason found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        if not self.problems:
            raise ValueError("ArtifactInvalid needs at least one problem")
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"artifact refused ({len(self.problems)} problem(s)):\n{lines}")

    def codes(self) -> set[str]:
        """The set of problem codes, handy for callers that branch on the kind of failure."""
        return {p.code for p in self.problems}


class StoreError(AdapterStoreError):
    """Base class of the versioned store's errors."""


class DomainNotFound(StoreError):
    """The domain has no version in the store (or its name could never be stored)."""


class VersionNotFound(StoreError):
    """The domain exists but not this version, or it has no active version."""


class BackboneNotFound(StoreError):
    """No backbone artifact has been put into the store."""


class StoreConflict(StoreError):
    """The operation contradicts the store's state (e.g. deleting the active version)."""


class StoreBusy(StoreError):
    """The store's write lock was not obtained within the timeout; retrying later may succeed."""


class StoreUnavailable(StoreError):
    """The store's backend (an S3 endpoint) failed or could not be reached; retrying later may succeed."""


class StoreCorrupt(StoreError):
    """The store's own index or files do not parse: never caused by a client, an operator must look."""


class StoreSymlink(StoreError):
    """A path below the store's root is a symbolic link, which the store never made: it refuses to read,
    write or delete through it (the link could point anywhere). An operator must replace or remove it."""


class StoreQuotaExceeded(StoreError):
    """A write would take the store past one of its quotas (``StoreQuotas``); deleting something first
    lets the same write succeed. ``limit`` names the quota, ``value`` is its configured maximum."""

    def __init__(self, limit: str, value: int, message: str) -> None:
        self.limit = limit
        self.value = value
        super().__init__(message)
