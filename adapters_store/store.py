"""The versioned store's interface and the values it returns.

``AdapterStore`` is what the server and the trainer program against; ``LocalStore`` (a directory
tree) is the embedded default, and an object-store backend can implement the same Protocol. A
replica only needs ``revision()`` to notice change: it is cheap, monotonic and bumped by every write.

Versions are immutable: ``put`` creates version N+1 of a domain (never reusing a number, even after
deletes), ``activate`` moves the domain's alias atomically, ``rollback`` moves it back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from adapters_store.errors import StoreCorrupt, VersionNotFound
from adapters_store.manifest import BackboneManifest, DomainManifest
from adapters_store.validation import ValidatedArtifact, ValidatedBackbone


def _read_verified(path: Path, expected_sha256: str, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise VersionNotFound(f"{what} was deleted") from None
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise StoreCorrupt(f"{what}: {path} does not match the sha256 in its manifest")
    return data


@dataclass(frozen=True)
class StoredDomain:
    """One stored version of a domain. ``manifest.version`` is its version number."""

    manifest: DomainManifest
    tensor_path: Path
    """A local safetensors file, for ``safetensors.torch.load_file(path, device=...)`` (mmap, fast)."""

    @property
    def domain(self) -> str:
        return self.manifest.domain

    @property
    def version(self) -> int:
        return self.manifest.version

    def read_tensor_bytes(self, *, verify: bool = True) -> bytes:
        """The tensor file's bytes; ``verify`` checks them against the manifest's sha256 (a few ms per MB)."""
        if not verify:
            try:
                return self.tensor_path.read_bytes()
            except FileNotFoundError:
                raise VersionNotFound(f"{self.domain} v{self.version} was deleted") from None
        return _read_verified(self.tensor_path, self.manifest.sha256, f"{self.domain} v{self.version}")


@dataclass(frozen=True)
class StoredBackbone:
    """The store's backbone artifact."""

    manifest: BackboneManifest
    tensor_path: Path

    def read_tensor_bytes(self, *, verify: bool = True) -> bytes:
        if not verify:
            return self.tensor_path.read_bytes()
        return _read_verified(self.tensor_path, self.manifest.sha256, f"backbone {self.manifest.name}")


@dataclass(frozen=True)
class DomainVersions:
    """What ``describe`` tells about a domain: its versions, the active one and the rollback history (the
    model family's ``DomainInfo`` is another thing: a loaded domain's config and class count)."""

    domain: str
    versions: tuple[int, ...]
    """Stored versions, ascending."""
    active: int | None
    """The version requests are served with; None until one is activated."""
    previous: tuple[int, ...]
    """Previously active versions, most recent last: what ``rollback`` returns to."""


@runtime_checkable
class AdapterStore(Protocol):
    """Versioned storage of one backbone artifact and many domain artifacts.

    Errors: ``DomainNotFound``, ``VersionNotFound``, ``BackboneNotFound`` (404), ``StoreConflict``
    (409), ``StoreBusy`` (503), ``StoreCorrupt`` (500); all subclasses of ``StoreError``.
    """

    def revision(self) -> int:
        """A number that grows with every write; cheap enough to poll."""
        ...

    def put_backbone(self, artifact: ValidatedBackbone) -> None:
        """Store the backbone (idempotent for the same fingerprint; a different one is a conflict while
        domains are stored)."""
        ...

    def get_backbone(self) -> StoredBackbone: ...

    def put(self, artifact: ValidatedArtifact, *, activate: bool = False) -> int:
        """Store a new immutable version of ``artifact.manifest.domain`` and return its number."""
        ...

    def get(self, domain: str, version: int | None = None) -> StoredDomain:
        """The active version (``version=None``) or the given one."""
        ...

    def list_domains(self) -> list[str]:
        """Names of the domains with at least one stored version, sorted."""
        ...

    def describe(self, domain: str) -> DomainVersions: ...

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
