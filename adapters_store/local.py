"""``LocalStore``: the versioned store as a directory tree (the embedded default).

Layout::

    root/index.json                             the only mutable file: versions, active aliases, revision
    root/.lock                                  writers' lock (flock)
    root/tmp/                                   staging; emptied by the next writer
    root/domains/<domain>/v<N>/manifest.json    immutable once published
    root/domains/<domain>/v<N>/adapter.safetensors
    root/backbones/<fingerprint>/manifest.json, backbone.safetensors

Crash safety comes from ordering, not from cleanup: a version's files are written into ``tmp/``,
fsynced, the directory is renamed into place (atomic) and fsynced, and only then is a new index
written beside the old one, fsynced and renamed over it. A writer killed at any point leaves either
the old index (the new version directory, if any, is an unlisted orphan that the next writer
deletes) or the new one (everything it lists is complete). Readers take no lock: they read whichever
index is in place and then immutable files. Deletes update the index first and remove files after.

Why ``filelock`` and a JSON index rather than SQLite: writers are rare and serialise on one flock
(released by the kernel when a writer dies, so a SIGKILL never leaves the store locked); readers need
no lock at all because the index is replaced atomically; the tree stays plain files an operator can
inspect, back up or rsync; and "write objects, then swap one small index" is exactly what an
object-store backend will do, so both backends share one consistency argument.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import filelock
from pydantic import BaseModel, Field, ValidationError

from adapters_store import nofollow
from adapters_store.errors import (
    ArtifactInvalid,
    BackboneNotFound,
    DomainNotFound,
    Problem,
    StoreBusy,
    StoreConflict,
    StoreCorrupt,
    StoreSymlink,
    VersionNotFound,
)
from adapters_store.manifest import (
    BACKBONE_TENSORS_NAME,
    DOMAIN_TENSORS_NAME,
    MANIFEST_NAME,
    is_safe_domain_name,
    manifest_to_json,
    parse_backbone_manifest,
    parse_domain_manifest,
)
from adapters_store.store import DomainInfo, StoredBackbone, StoredDomain
from adapters_store.validation import ValidatedArtifact, ValidatedBackbone

FaultHook = Callable[[str], None]
"""Called with the name of each step of a write (``locked``, ``write:<file>`` after every chunk,
``staged``, ``published``, ``index-staged``, ``index-renamed``, ``index-synced``): tests and
``bench/store_crash.py`` block or die there to prove crash safety. None in production."""

INDEX_NAME = "index.json"
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
_VERSION_DIR_RE = re.compile(r"v([1-9][0-9]{0,17})")
# The index is written with "revision" as its first key, so revision() reads only a few bytes.
_REVISION_RE = re.compile(rb'\{"revision":([0-9]+)[,}]')
_MAX_PREVIOUS = 64


class _DomainEntry(BaseModel):
    versions: list[int] = Field(default_factory=list)
    active: int | None = None
    previous: list[int] = Field(default_factory=list)


class _Index(BaseModel):
    revision: int = 0  # keep first: see _REVISION_RE
    format: Literal[1] = 1
    backbone: str | None = None
    next_version: dict[str, int] = Field(default_factory=dict)
    """Survives delete_domain, so a re-created domain never reuses a number a cache may hold."""
    domains: dict[str, _DomainEntry] = Field(default_factory=dict)


_LAYOUT = ("tmp", "domains", "backbones", INDEX_NAME, ".lock")
"""What the store makes directly below its root; none of it may be a symlink."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """``AdapterStore`` on a local directory; safe for concurrent threads and processes.

    Raises ``StoreSymlink`` (on opening, and before any write) when something below the root is a
    symbolic link: the store never follows links it did not create (``adapters_store.nofollow``).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        lock_timeout: float = 60.0,
        fault_hook: FaultHook | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self.root = Path(root)
        self._lock = filelock.FileLock(
            self.root / ".lock",
            timeout=lock_timeout,
            # Per-thread holds: threads of one process exclude each other through separate flocks.
            thread_local=True,
            # Keep the lock file (unlinking it on release races with waiters) and never fall back to a
            # soft lock, which a SIGKILLed writer would leave behind.
            preserve_lock_file=True,
        )
        self._fault_hook = fault_hook
        self._chunk_bytes = chunk_bytes
        self.check_no_symlinks()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def check_no_symlinks(self) -> None:
        """Raise ``StoreSymlink`` if the store's layout or a domain directory is a symlink (the root may be)."""
        for name in _LAYOUT:
            nofollow.refuse_symlinks(self.root, name)
        for domain in nofollow.list_dir(self.root, "domains"):
            nofollow.refuse_symlinks(self.root, "domains", domain)

    # -- reading (no lock) ---------------------------------------------------------------------------
    def revision(self) -> int:
        try:
            head = nofollow.read_head(self.root, [INDEX_NAME], 64)
        except FileNotFoundError:
            return 0
        match = _REVISION_RE.match(head)
        return int(match.group(1)) if match else self._read_index().revision

    def list_domains(self) -> list[str]:
        return sorted(self._read_index().domains)

    def describe(self, domain: str) -> DomainInfo:
        entry = self._entry(self._read_index(), domain)
        return DomainInfo(domain, tuple(sorted(entry.versions)), entry.active, tuple(entry.previous))

    def get(self, domain: str, version: int | None = None) -> StoredDomain:
        entry = self._entry(self._read_index(), domain)
        if version is None:
            if entry.active is None:
                raise VersionNotFound(f"domain {domain!r} has no active version")
            version = entry.active
        if version not in entry.versions:
            raise VersionNotFound(f"domain {domain!r} has no version {version}")
        vdir = self._version_dir(domain, version)
        try:
            manifest = parse_domain_manifest(
                nofollow.read_bytes(self.root, *self._version_parts(domain, version), MANIFEST_NAME)
            )
        except FileNotFoundError:
            # Listed by the index we read, deleted since: the version is gone.
            raise VersionNotFound(f"domain {domain!r} version {version} was deleted") from None
        except ArtifactInvalid as exc:
            raise StoreCorrupt(f"{vdir / MANIFEST_NAME}: {exc}") from None
        if manifest.domain != domain or manifest.version != version:
            raise StoreCorrupt(f"{vdir / MANIFEST_NAME} names {manifest.domain} v{manifest.version}")
        return StoredDomain(manifest, vdir / DOMAIN_TENSORS_NAME)

    def get_backbone(self) -> StoredBackbone:
        fingerprint = self._read_index().backbone
        if fingerprint is None:
            raise BackboneNotFound(f"no backbone in {self.root}")
        bdir = self.root / "backbones" / fingerprint
        try:
            manifest = parse_backbone_manifest(
                nofollow.read_bytes(self.root, "backbones", fingerprint, MANIFEST_NAME)
            )
        except (FileNotFoundError, ArtifactInvalid) as exc:
            raise StoreCorrupt(f"backbone {fingerprint}: {exc}") from None
        return StoredBackbone(manifest, bdir / BACKBONE_TENSORS_NAME)

    # -- writing (under the lock) --------------------------------------------------------------------
    def put(self, artifact: ValidatedArtifact, *, activate: bool = False) -> int:
        manifest = artifact.manifest
        domain = manifest.domain
        # Validation guarantees this, but model_copy() can bypass it and the name becomes a path.
        if not is_safe_domain_name(domain):
            raise ArtifactInvalid([Problem("manifest.domain", f"unsafe domain name {domain!r}", "schema")])
        with self._writing() as index:
            if index.backbone is not None and index.backbone != manifest.backbone_fingerprint:
                raise StoreConflict(
                    f"{domain} was trained on backbone {manifest.backbone_fingerprint[:16]}..., "
                    f"the store's backbone is {index.backbone[:16]}..."
                )
            self._sweep_orphans(index, domain)
            version = index.next_version.get(domain, 1)
            stored = manifest.model_copy(update={"version": version})
            staging = self._stage(
                {DOMAIN_TENSORS_NAME: artifact.tensor_bytes, MANIFEST_NAME: manifest_to_json(stored)}
            )
            self._publish(staging, self._version_dir(domain, version))
            entry = index.domains.setdefault(domain, _DomainEntry())
            entry.versions.append(version)
            index.next_version[domain] = version + 1
            if activate:
                self._set_active(entry, version)
            self._commit(index)
            return version

    def activate(self, domain: str, version: int) -> None:
        with self._writing() as index:
            entry = self._entry(index, domain)
            if version not in entry.versions:
                raise VersionNotFound(f"domain {domain!r} has no version {version}")
            if entry.active == version:
                return  # nothing changes, so no new revision
            self._set_active(entry, version)
            self._commit(index)

    def rollback(self, domain: str) -> int:
        with self._writing() as index:
            entry = self._entry(index, domain)
            while entry.previous:
                version = entry.previous.pop()
                if version in entry.versions and version != entry.active:
                    entry.active = version
                    self._commit(index)
                    return version
            raise StoreConflict(f"domain {domain!r} has no previously active version to roll back to")

    def delete_version(self, domain: str, version: int) -> None:
        with self._writing() as index:
            entry = self._entry(index, domain)
            if version not in entry.versions:
                raise VersionNotFound(f"domain {domain!r} has no version {version}")
            if entry.active == version:
                raise StoreConflict(
                    f"version {version} is active for {domain!r}; activate another or delete the domain"
                )
            nofollow.refuse_symlinks(self.root, *self._version_parts(domain, version))
            entry.versions.remove(version)
            entry.previous = [v for v in entry.previous if v != version]
            if not entry.versions:
                del index.domains[domain]
            self._commit(index)
            # Files go after the index no longer lists them; a crash here leaves an orphan, swept later.
            nofollow.remove_tree(self.root, *self._version_parts(domain, version))

    def delete_domain(self, domain: str) -> None:
        with self._writing() as index:
            self._entry(index, domain)
            nofollow.refuse_symlinks(self.root, "domains", domain)
            del index.domains[domain]
            self._commit(index)
            nofollow.remove_tree(self.root, "domains", domain)

    def put_backbone(self, artifact: ValidatedBackbone) -> None:
        fingerprint = artifact.manifest.fingerprint
        if _FINGERPRINT_RE.fullmatch(fingerprint) is None:  # it becomes a directory name
            raise ArtifactInvalid([Problem("manifest.fingerprint", "not a lowercase hex sha256", "schema")])
        with self._writing() as index:
            if index.backbone == fingerprint:
                return
            if index.backbone is not None and index.domains:
                raise StoreConflict(
                    f"the store holds {len(index.domains)} domain(s) for backbone {index.backbone[:16]}...; "
                    "delete them before replacing the backbone"
                )
            old = index.backbone
            self._sweep_tmp()
            target = self.root / "backbones" / fingerprint
            nofollow.remove_tree(
                self.root, "backbones", fingerprint
            )  # an orphan of an interrupted put_backbone
            staging = self._stage(
                {
                    BACKBONE_TENSORS_NAME: artifact.tensor_bytes,
                    MANIFEST_NAME: manifest_to_json(artifact.manifest),
                }
            )
            self._publish(staging, target)
            index.backbone = fingerprint
            self._commit(index)
            if old is not None:
                nofollow.remove_tree(self.root, "backbones", old)

    # -- checking ------------------------------------------------------------------------------------
    def verify(self) -> list[Problem]:
        """Check every listed version (manifest parses, names itself, checksum matches) and the aliases.

        An empty list means the store is consistent. Unlisted directories (orphans of interrupted
        writes) are not problems: nothing refers to them and the next writer removes them.
        """
        problems: list[Problem] = []
        index = self._read_index()
        for domain, entry in sorted(index.domains.items()):
            field = f"domains/{domain}"
            if not is_safe_domain_name(domain):
                problems.append(Problem(field, "unsafe domain name in the index", "index"))
                continue
            if entry.active is not None and entry.active not in entry.versions:
                problems.append(Problem(field, f"active version {entry.active} is not stored", "index"))
            if any(v >= index.next_version.get(domain, 1) for v in entry.versions):
                problems.append(Problem(field, "next_version does not exceed every stored version", "index"))
            for version in entry.versions:
                try:
                    self.get(domain, version).read_tensor_bytes(verify=True)
                except (StoreCorrupt, StoreSymlink, VersionNotFound) as exc:
                    problems.append(Problem(f"{field}/v{version}", str(exc), "version"))
        if index.backbone is not None:
            try:
                self.get_backbone().read_tensor_bytes(verify=True)
            except (StoreCorrupt, StoreSymlink, OSError) as exc:
                problems.append(Problem("backbone", str(exc), "backbone"))
        return problems

    # -- internals -----------------------------------------------------------------------------------
    def _fault(self, step: str) -> None:
        if self._fault_hook is not None:
            self._fault_hook(step)

    def _read_index(self) -> _Index:
        try:
            data = nofollow.read_bytes(self.root, INDEX_NAME)
        except FileNotFoundError:
            return _Index()
        try:
            return _Index.model_validate_json(data)
        except ValidationError as exc:
            raise StoreCorrupt(f"{self.root / INDEX_NAME} does not parse: {exc}") from None

    @staticmethod
    def _entry(index: _Index, domain: str) -> _DomainEntry:
        entry = index.domains.get(domain) if is_safe_domain_name(domain) else None
        if entry is None:
            raise DomainNotFound(f"no domain {domain!r}")
        return entry

    def _version_dir(self, domain: str, version: int) -> Path:
        return self.root.joinpath(*self._version_parts(domain, version))

    @staticmethod
    def _version_parts(domain: str, version: int) -> tuple[str, str, str]:
        return ("domains", domain, f"v{version}")

    @staticmethod
    def _set_active(entry: _DomainEntry, version: int) -> None:
        if entry.active is not None:
            entry.previous = [*entry.previous, entry.active][-_MAX_PREVIOUS:]
        entry.active = version

    @contextmanager
    def _writing(self) -> Iterator[_Index]:
        """Hold the write lock and yield the current index; the caller commits it (or not)."""
        for sub in ("tmp", "domains", "backbones"):
            nofollow.make_dirs(self.root, sub)
        nofollow.refuse_symlinks(self.root, ".lock")  # filelock would open (and truncate) a link's target
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise StoreBusy(f"{self.root} is locked by another writer") from None
        try:
            self._fault("locked")
            self.check_no_symlinks()  # again under the lock: what we checked before may have changed
            yield self._read_index()
        finally:
            self._lock.release()

    def _write_file(self, path: Path, data: bytes, step: str | None = None) -> None:
        step = f"write:{step or path.name}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            for start in range(0, max(len(data), 1), self._chunk_bytes):
                os.write(fd, view[start : start + self._chunk_bytes])
                self._fault(step)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _stage(self, files: dict[str, bytes]) -> Path:
        staging = self.root / "tmp" / uuid.uuid4().hex
        staging.mkdir()
        for name, data in files.items():
            self._write_file(staging / name, data)
        _fsync_dir(staging)
        self._fault("staged")
        return staging

    def _publish(self, staging: Path, target: Path) -> None:
        parent_existed = target.parent.exists()
        nofollow.make_dirs(self.root, *target.parent.relative_to(self.root).parts)
        if not parent_existed:
            _fsync_dir(target.parent.parent)
        os.rename(staging, target)
        self._fault("published")
        _fsync_dir(target.parent)

    def _commit(self, index: _Index) -> None:
        index.revision += 1
        tmp = self.root / "tmp" / f"index-{uuid.uuid4().hex}.json"
        self._write_file(tmp, index.model_dump_json().encode("utf-8"), INDEX_NAME)
        self._fault("index-staged")
        os.replace(tmp, self.root / INDEX_NAME)
        self._fault("index-renamed")
        _fsync_dir(self.root)
        self._fault("index-synced")

    def _sweep_tmp(self) -> None:
        # Under the lock nobody else is staging, so whatever is in tmp/ belongs to a dead writer.
        for name in nofollow.list_dir(self.root, "tmp"):
            nofollow.remove_tree(self.root, "tmp", name)

    def _sweep_orphans(self, index: _Index, domain: str) -> None:
        """Remove what interrupted writes left behind: staging files and unlisted version directories."""
        self._sweep_tmp()
        listed = set(index.domains[domain].versions) if domain in index.domains else set()
        for name in nofollow.list_dir(self.root, "domains", domain):
            match = _VERSION_DIR_RE.fullmatch(name)
            if match is None or int(match.group(1)) not in listed:
                nofollow.remove_tree(self.root, "domains", domain, name)
