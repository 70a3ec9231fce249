"""The versioned store's interface and the values it returns.

``AdapterStore`` is what the server and the trainer program against; ``LocalStore`` (a directory
tree) is the embedded default and ``S3Store`` (an S3 bucket) the shared one; ``open_store`` picks one
from a directory or an ``s3://`` URL. A replica only needs ``revision()`` to notice change: an opaque
token, cheap to read, that changes with every write (compare it for equality only, never order).

Versions are immutable: ``put`` creates version N+1 of a domain (never reusing a number, even after
deletes), ``activate`` moves the domain's alias atomically, ``rollback`` moves it back. Tensors are
read as bytes (``StoredDomain.read_tensor_bytes``), never from a path, so a backend need not be a
local file system.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol, runtime_checkable

from adapters_store.errors import BackboneNotFound, Problem, StoreCorrupt, StoreError
from adapters_store.index import DomainVersions, StoreQuotas
from adapters_store.manifest import BackboneManifest, DomainManifest
from adapters_store.validation import ValidatedArtifact, ValidatedBackbone, sha256_hex

__all__ = [
    "AdapterStore",
    "DomainVersions",
    "StoreQuotas",
    "StoredBackbone",
    "StoredDomain",
    "verify_objects",
]

ReadVersion = Callable[[int], tuple[DomainManifest, bytes]]
"""For ``restore_domain``: version number -> (its manifest, its tensor bytes)."""


def _checked(data: bytes, expected_sha256: str, what: str) -> bytes:
    if sha256_hex(data) != expected_sha256:
        raise StoreCorrupt(f"{what}: the stored tensors do not match the sha256 in its manifest")
    return data


@dataclass(frozen=True)
class StoredDomain:
    """One stored version of a domain. ``manifest.version`` is its version number."""

    manifest: DomainManifest
    read_bytes: Callable[[], bytes] = field(repr=False, compare=False)
    """Fetches the tensor file's bytes from the backend (``VersionNotFound`` once it was deleted)."""

    @property
    def domain(self) -> str:
        return self.manifest.domain

    @property
    def version(self) -> int:
        return self.manifest.version

    def read_tensor_bytes(self, *, verify: bool = True) -> bytes:
        """The tensor file's bytes; ``verify`` checks them against the manifest's sha256 (a few ms per MB)."""
        data = self.read_bytes()
        return _checked(data, self.manifest.sha256, f"{self.domain} v{self.version}") if verify else data


@dataclass(frozen=True)
class StoredBackbone:
    """The store's backbone artifact."""

    manifest: BackboneManifest
    read_bytes: Callable[[], bytes] = field(repr=False, compare=False)

    def read_tensor_bytes(self, *, verify: bool = True) -> bytes:
        data = self.read_bytes()
        return _checked(data, self.manifest.sha256, f"backbone {self.manifest.name}") if verify else data


@runtime_checkable
class AdapterStore(Protocol):
    """Versioned storage of one backbone artifact and many domain artifacts.

    Errors: ``DomainNotFound``, ``VersionNotFound``, ``BackboneNotFound`` (404), ``StoreConflict``
    (409), ``StoreQuotaExceeded`` (409), ``StoreBusy`` (503), ``StoreCorrupt`` / ``StoreSymlink``
    (500); all subclasses of ``StoreError``.
    """

    quotas: StoreQuotas

    def revision(self) -> str:
        """An opaque token that changes with every write; cheap enough to poll. Compare with ``==``."""
        ...

    def put_backbone(self, artifact: ValidatedBackbone) -> None:
        """Store the backbone (idempotent for the same fingerprint; a different one is a conflict while
        domains are stored)."""
        ...

    def get_backbone(self) -> StoredBackbone: ...

    def put(self, artifact: ValidatedArtifact, *, activate: bool = False) -> int:
        """Store a new immutable version of ``artifact.manifest.domain`` and return its number."""
        ...

    def put_if_new(self, artifact: ValidatedArtifact, *, activate: bool = False) -> int | None:
        """Like ``put``, but only if the domain has never had a version; else change nothing and return
        None. Several processes bootstrapping one store at once make exactly one version."""
        ...

    def get(self, domain: str, version: int | None = None) -> StoredDomain:
        """The active version (``version=None``) or the given one."""
        ...

    def list_domains(self) -> list[str]:
        """Names of the domains with at least one stored version, sorted."""
        ...

    def describe(self, domain: str) -> DomainVersions: ...

    def describe_all(self) -> list[DomainVersions]:
        """Every domain, sorted by name, from one read of the index."""
        ...

    def activate(self, domain: str, version: int) -> None:
        """Make ``version`` the one served (atomic; remembers the previous one for ``rollback``)."""
        ...

    def rollback(self, domain: str) -> int:
        """Re-activate the previously active version and return it."""
        ...

    def delete_version(self, domain: str, version: int) -> None:
        """Delete a version that is not active (``StoreConflict`` if it is)."""
        ...

    def delete_domain(self, domain: str) -> None:
        """Delete every version of a domain; its version numbers are still never reused."""
        ...

    def restore_domain(self, info: DomainVersions, read: ReadVersion) -> None:
        """Store a domain copied from another store with its numbers, active version and rollback
        history (``copy_store``); ``StoreConflict`` if the domain exists or existed here."""
        ...

    def verify(self) -> list[Problem]:
        """Every problem with the index and the objects it lists (empty: consistent)."""
        ...

    def collect_garbage(self, min_age: timedelta = timedelta(hours=1)) -> list[str]:
        """Delete objects no index lists that interrupted writers left behind (on S3 only those older
        than ``min_age``, so a put still on its way to the index swap keeps its objects); return them."""
        ...


class PutByPrimitive:
    """``put`` and ``put_if_new`` of both backends, over their one primitive ``_put``."""

    def _put(self, artifact: ValidatedArtifact, activate: bool, *, only_if_new: bool) -> int | None:
        raise NotImplementedError

    def put(self, artifact: ValidatedArtifact, *, activate: bool = False) -> int:
        version = self._put(artifact, activate, only_if_new=False)
        assert version is not None  # only a put_if_new changes nothing
        return version

    def put_if_new(self, artifact: ValidatedArtifact, *, activate: bool = False) -> int | None:
        return self._put(artifact, activate, only_if_new=True)


def verify_objects(store: AdapterStore) -> list[Problem]:
    """Load every listed version and the backbone and check each against its manifest's sha256."""
    problems: list[Problem] = []
    for info in store.describe_all():
        for version in info.versions:
            try:
                store.get(info.domain, version).read_tensor_bytes(verify=True)
            except StoreError as exc:
                problems.append(Problem(f"domains/{info.domain}/v{version}", str(exc), "version"))
    try:
        store.get_backbone().read_tensor_bytes(verify=True)
    except BackboneNotFound:
        pass  # a store without a backbone is not inconsistent (domains are checked against none yet)
    except StoreError as exc:
        problems.append(Problem("backbone", str(exc), "backbone"))
    return problems
