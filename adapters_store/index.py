"""The store's index: the one mutable document of every backend, and each change to it as a method.

Both backends keep immutable version objects under unique keys and one small JSON index that lists
them; they differ only in how the index is swapped (``LocalStore``: a rename under a file lock;
``S3Store``: a conditional PUT that is retried on a fresh read when another writer won). So the
rules — numbering, aliases, rollback history, quotas — live here once, as changes applied to a freshly
read ``StoreIndex``; a backend reads, applies, and commits (or, on S3, re-reads and re-applies).

A version's number is assigned by ``add_version`` from ``next_version``, at commit time: two writers
that uploaded at once hold distinct object keys, and whichever commits second gets the next number.
``next_version`` survives ``remove_domain``, so a number is never reused, even for a re-created domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from adapters_store.errors import (
    DomainNotFound,
    Problem,
    StoreConflict,
    StoreQuotaExceeded,
    VersionNotFound,
)
from adapters_store.manifest import is_safe_domain_name

MAX_PREVIOUS = 64
"""Rollback history kept per domain."""


@dataclass(frozen=True)
class StoreQuotas:
    """Limits on what a store may hold; None means unlimited. Checked at every write, in every backend."""

    max_domains: int | None = None
    """Domains with at least one stored version."""
    max_versions_per_domain: int | None = None
    """Stored versions of one domain (delete old ones to make room)."""
    max_store_bytes: int | None = None
    """Bytes of every listed object together: each version's manifest and tensors, and the backbone."""


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
    next_version: int = 0
    """The number the next put will get (0: not known)."""


class VersionRecord(BaseModel):
    key: str
    """The version's object key below ``domains/<domain>/`` (a uuid; ``v<N>`` in stores made before)."""
    bytes: int = Field(ge=0)
    """Manifest plus tensor bytes, for ``max_store_bytes``."""


class BackboneRecord(BaseModel):
    fingerprint: str
    key: str
    """The backbone's object key below ``backbones/``."""
    bytes: int = Field(ge=0)


class DomainRecord(BaseModel):
    versions: dict[int, VersionRecord] = Field(default_factory=dict)
    active: int | None = None
    previous: list[int] = Field(default_factory=list)


class StoreIndex(BaseModel):
    revision: int = 0
    """Bumped by every commit. Keep it the first field: ``LocalStore.revision`` reads only the head."""
    format: Literal[2] = 2
    backbone: BackboneRecord | None = None
    next_version: dict[str, int] = Field(default_factory=dict)
    """Per domain; survives ``remove_domain`` so a re-created domain never reuses a number a cache holds."""
    domains: dict[str, DomainRecord] = Field(default_factory=dict)

    # -- reading ---------------------------------------------------------------------------------
    def entry(self, domain: str) -> DomainRecord:
        found = self.domains.get(domain) if is_safe_domain_name(domain) else None
        if found is None:
            raise DomainNotFound(f"no domain {domain!r}")
        return found

    def describe(self, domain: str) -> DomainVersions:
        entry = self.entry(domain)
        return DomainVersions(
            domain,
            tuple(sorted(entry.versions)),
            entry.active,
            tuple(entry.previous),
            self.next_version.get(domain, 1),
        )

    def describe_all(self) -> list[DomainVersions]:
        return [self.describe(domain) for domain in sorted(self.domains)]

    def resolve(self, domain: str, version: int | None) -> tuple[int, VersionRecord]:
        """``(number, record)`` of the active version (``version=None``) or the given one."""
        entry = self.entry(domain)
        if version is None:
            if entry.active is None:
                raise VersionNotFound(f"domain {domain!r} has no active version")
            version = entry.active
        record = entry.versions.get(version)
        if record is None:
            raise VersionNotFound(f"domain {domain!r} has no version {version}")
        return version, record

    def stored_bytes(self) -> int:
        listed = sum(r.bytes for e in self.domains.values() for r in e.versions.values())
        return listed + (self.backbone.bytes if self.backbone is not None else 0)

    def object_keys(self) -> set[tuple[str, str]]:
        """Every listed object key as ``(kind, key)``: ``("domains/<d>", key)`` or ``("backbones", key)``."""
        out = {(f"domains/{d}", r.key) for d, e in self.domains.items() for r in e.versions.values()}
        if self.backbone is not None:
            out.add(("backbones", self.backbone.key))
        return out

    def problems(self) -> list[Problem]:
        """What is wrong with the index itself (the objects it lists are checked by ``verify_store``)."""
        problems: list[Problem] = []
        for domain, entry in sorted(self.domains.items()):
            field = f"domains/{domain}"
            if not is_safe_domain_name(domain):
                problems.append(Problem(field, "unsafe domain name in the index", "index"))
            if entry.active is not None and entry.active not in entry.versions:
                problems.append(Problem(field, f"active version {entry.active} is not stored", "index"))
            if any(v >= self.next_version.get(domain, 1) for v in entry.versions):
                problems.append(Problem(field, "next_version does not exceed every stored version", "index"))
        return problems

    # -- changes (the caller commits) ------------------------------------------------------------
    def add_version(
        self,
        domain: str,
        record: VersionRecord,
        *,
        fingerprint: str,
        activate: bool,
        quotas: StoreQuotas,
        only_if_new: bool = False,
    ) -> int | None:
        """List a new version under the next number and return it; None (nothing changed) when
        ``only_if_new`` and the domain has ever had a version."""
        if self.backbone is not None and self.backbone.fingerprint != fingerprint:
            raise StoreConflict(
                f"{domain} was trained on backbone {fingerprint[:16]}..., "
                f"the store's backbone is {self.backbone.fingerprint[:16]}..."
            )
        entry = self.domains.get(domain)
        if entry is not None:
            for number, listed in entry.versions.items():
                if listed.key == record.key:
                    # Re-applied after a write whose answer was lost but which did land: already listed.
                    return number
        if only_if_new and (domain in self.next_version or domain in self.domains):
            return None
        self._check_quotas(quotas, domain, entry, record.bytes)
        if entry is None:
            entry = self.domains[domain] = DomainRecord()
        version = max(self.next_version.get(domain, 1), max(entry.versions, default=0) + 1)
        entry.versions[version] = record
        self.next_version[domain] = version + 1
        if activate:
            self._set_active(entry, version)
        return version

    def activate(self, domain: str, version: int) -> bool:
        """Make ``version`` active; False when it already was (nothing to commit)."""
        entry = self.entry(domain)
        if version not in entry.versions:
            raise VersionNotFound(f"domain {domain!r} has no version {version}")
        if entry.active == version:
            return False
        self._set_active(entry, version)
        return True

    def rollback(self, domain: str) -> int:
        entry = self.entry(domain)
        while entry.previous:
            version = entry.previous.pop()
            if version in entry.versions and version != entry.active:
                entry.active = version
                return version
        raise StoreConflict(f"domain {domain!r} has no previously active version to roll back to")

    def remove_version(self, domain: str, version: int) -> VersionRecord:
        entry = self.entry(domain)
        record = entry.versions.get(version)
        if record is None:
            raise VersionNotFound(f"domain {domain!r} has no version {version}")
        if entry.active == version:
            raise StoreConflict(
                f"version {version} is active for {domain!r}; activate another or delete the domain"
            )
        del entry.versions[version]
        entry.previous = [v for v in entry.previous if v != version]
        if not entry.versions:
            del self.domains[domain]
        return record

    def remove_domain(self, domain: str) -> list[VersionRecord]:
        entry = self.entry(domain)
        del self.domains[domain]
        return list(entry.versions.values())

    def set_backbone(self, record: BackboneRecord, quotas: StoreQuotas) -> BackboneRecord | None:
        """Make ``record`` the backbone and return the one it replaces; refused while domains are stored
        for another backbone. The caller checks first whether this fingerprint is already stored."""
        old = self.backbone
        if old is not None and self.domains:
            raise StoreConflict(
                f"the store holds {len(self.domains)} domain(s) for backbone {old.fingerprint[:16]}...; "
                "delete them before replacing the backbone"
            )
        limit = quotas.max_store_bytes
        total = self.stored_bytes() - (old.bytes if old is not None else 0) + record.bytes
        if limit is not None and total > limit:
            raise StoreQuotaExceeded(
                "max_store_bytes",
                limit,
                f"the backbone ({record.bytes} bytes) would exceed max_store_bytes={limit}",
            )
        self.backbone = record
        return old

    def restore_domain(
        self, info: DomainVersions, records: dict[int, VersionRecord], quotas: StoreQuotas
    ) -> None:
        """List a copied domain with its own numbers and history (``copy_store``); the domain must never
        have existed here, so no number it brings can collide with one already handed out."""
        self.ensure_never_existed(info.domain)
        if quotas.max_versions_per_domain is not None and len(records) > quotas.max_versions_per_domain:
            raise StoreQuotaExceeded(
                "max_versions_per_domain",
                quotas.max_versions_per_domain,
                f"{info.domain!r} has {len(records)} versions, more than max_versions_per_domain="
                f"{quotas.max_versions_per_domain}",
            )
        self._check_quotas(quotas, info.domain, None, sum(r.bytes for r in records.values()))
        self.domains[info.domain] = DomainRecord(
            versions=dict(records), active=info.active, previous=list(info.previous)
        )
        self.next_version[info.domain] = max(info.next_version, max(records, default=0) + 1)

    def ensure_never_existed(self, domain: str) -> None:
        if domain in self.domains or domain in self.next_version:
            raise StoreConflict(f"domain {domain!r} exists (or existed) in this store: its numbers are taken")

    # -- internals -------------------------------------------------------------------------------
    def _check_quotas(
        self, quotas: StoreQuotas, domain: str, entry: DomainRecord | None, new_bytes: int
    ) -> None:
        if entry is None and quotas.max_domains is not None and len(self.domains) >= quotas.max_domains:
            raise StoreQuotaExceeded(
                "max_domains",
                quotas.max_domains,
                f"the store holds {len(self.domains)} domains, its limit (max_domains={quotas.max_domains}); "
                f"delete a domain before adding {domain!r}",
            )
        limit = quotas.max_versions_per_domain
        if entry is not None and limit is not None and len(entry.versions) >= limit:
            raise StoreQuotaExceeded(
                "max_versions_per_domain",
                limit,
                f"{domain!r} has {len(entry.versions)} versions, its limit (max_versions_per_domain={limit}); "
                "delete an old version first",
            )
        total = self.stored_bytes() + new_bytes
        if quotas.max_store_bytes is not None and total > quotas.max_store_bytes:
            raise StoreQuotaExceeded(
                "max_store_bytes",
                quotas.max_store_bytes,
                f"storing {new_bytes} bytes would make the store {total} bytes, over its limit "
                f"(max_store_bytes={quotas.max_store_bytes})",
            )

    @staticmethod
    def _set_active(entry: DomainRecord, version: int) -> None:
        if entry.active is not None:
            entry.previous = [*entry.previous, entry.active][-MAX_PREVIOUS:]
        entry.active = version
