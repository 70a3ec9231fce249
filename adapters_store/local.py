"""``LocalStore``: the versioned store as a directory tree (the embedded default).

Layout::

    root/index.json                             the only mutable file (``StoreIndex``, format 2)
    root/.lock                                  writers' lock (flock)
    root/tmp/                                   staging; emptied by the next writer
    root/domains/<domain>/<key>/manifest.json   one immutable version per unique key (a uuid)
    root/domains/<domain>/<key>/adapter.safetensors
    root/backbones/<key>/manifest.json, backbone.safetensors

The index maps each version number to its key; a version's number lives only in the index (the stored
manifest says 0 and ``get`` fills in the number), exactly as in ``S3Store``.

Crash safety comes from ordering, not from cleanup: a version's files are written into ``tmp/``,
fsynced, the directory is renamed into place (atomic) and fsynced, and only then is a new index
written beside the old one, fsynced and renamed over it. A writer killed at any point leaves either
the old index (the new version directory, if any, is an unlisted orphan that the next writer
deletes) or the new one (everything it lists is complete). Readers take no lock: they read whichever
index is in place and then immutable files. Deletes update the index first and remove files after.

Nothing below the root is ever followed if it is a symlink (``adapters_store.nofollow``): a linked
``tmp/`` or domain directory makes the store refuse with ``StoreSymlink``, so a sweep can never delete
a link's target. The root itself may be a link (a mounted volume).

Why ``filelock`` and a JSON index rather than SQLite: writers are rare and serialise on one flock
(released by the kernel when a writer dies, so a SIGKILL never leaves the store locked); readers need
no lock at all because the index is replaced atomically; the tree stays plain files an operator can
inspect, back up or rsync; and "write objects, then swap one small index" is exactly what
``S3Store`` does, so both backends share one consistency argument (``adapters_store.index``).

Stores written before format 2 (versions in ``v<N>`` directories, the backbone under its fingerprint)
are read as they are and rewritten in format 2 by the next write.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Literal

import filelock
from pydantic import BaseModel, Field, ValidationError

from adapters_store import nofollow
from adapters_store.errors import (
    ArtifactInvalid,
    BackboneNotFound,
    Problem,
    StoreBusy,
    StoreCorrupt,
    VersionNotFound,
)
from adapters_store.index import (
    BackboneRecord,
    DomainRecord,
    DomainVersions,
    StoreIndex,
    StoreQuotas,
    VersionRecord,
)
from adapters_store.manifest import (
    BACKBONE_TENSORS_NAME,
    DOMAIN_TENSORS_NAME,
    MANIFEST_NAME,
    parse_backbone_manifest,
)
from adapters_store.objects import backbone_objects, domain_objects, restored_objects, stored_manifest
from adapters_store.store import PutByPrimitive, ReadVersion, StoredBackbone, StoredDomain, verify_objects
from adapters_store.validation import ValidatedArtifact, ValidatedBackbone

FaultHook = Callable[[str], None]
"""Called with the name of each step of a write (``locked``, ``write:<file>`` after every chunk,
``staged``, ``published``, ``index-staged``, ``index-renamed``, ``index-synced``): tests and
``bench/store_crash.py`` block or die there to prove crash safety. None in production."""

INDEX_NAME = "index.json"
# The index is written with "revision" as its first key, so revision() reads only a few bytes.
_REVISION_RE = re.compile(rb'\{"revision":([0-9]+)[,}]')
_LAYOUT = ("tmp", "domains", "backbones", INDEX_NAME, ".lock")
"""What the store makes directly below its root; none of it may be a symlink."""


class _Format1Entry(BaseModel):
    versions: list[int] = Field(default_factory=list)
    active: int | None = None
    previous: list[int] = Field(default_factory=list)


class _Format1Index(BaseModel):
    """The index of stores written before format 2: versions in ``v<N>`` directories."""

    revision: int = 0
    format: Literal[1] = 1
    backbone: str | None = None
    next_version: dict[str, int] = Field(default_factory=dict)
    domains: dict[str, _Format1Entry] = Field(default_factory=dict)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(PutByPrimitive):
    """``AdapterStore`` on a local directory; safe for concurrent threads and processes.

    Raises ``StoreSymlink`` (on opening, and before any write) when something below the root is a
    symbolic link: the store never follows links it did not create (``adapters_store.nofollow``).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        quotas: StoreQuotas | None = None,
        lock_timeout: float = 60.0,
        fault_hook: FaultHook | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self.root = Path(root)
        self.quotas = quotas if quotas is not None else StoreQuotas()
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
    def revision(self) -> str:
        try:
            head = nofollow.read_head(self.root, [INDEX_NAME], 64)
        except FileNotFoundError:
            return "0"
        match = _REVISION_RE.match(head)
        return match.group(1).decode() if match else str(self._read_index().revision)

    def list_domains(self) -> list[str]:
        return sorted(self._read_index().domains)

    def describe(self, domain: str) -> DomainVersions:
        return self._read_index().describe(domain)

    def describe_all(self) -> list[DomainVersions]:
        return self._read_index().describe_all()

    def get(self, domain: str, version: int | None = None) -> StoredDomain:
        number, record = self._read_index().resolve(domain, version)
        parts = ("domains", domain, record.key)
        try:
            data = nofollow.read_bytes(self.root, *parts, MANIFEST_NAME)
        except FileNotFoundError:
            # Listed by the index we read, deleted since: the version is gone.
            raise VersionNotFound(f"domain {domain!r} version {number} was deleted") from None
        manifest = stored_manifest(data, domain, number, "/".join(parts))

        def read_bytes() -> bytes:
            try:
                return nofollow.read_bytes(self.root, *parts, DOMAIN_TENSORS_NAME)
            except FileNotFoundError:
                raise VersionNotFound(f"{domain} v{number} was deleted") from None

        return StoredDomain(manifest, read_bytes)

    def get_backbone(self) -> StoredBackbone:
        record = self._read_index().backbone
        if record is None:
            raise BackboneNotFound(f"no backbone in {self.root}")
        parts = ("backbones", record.key)
        try:
            manifest = parse_backbone_manifest(nofollow.read_bytes(self.root, *parts, MANIFEST_NAME))
        except (FileNotFoundError, ArtifactInvalid) as exc:
            raise StoreCorrupt(f"backbone {record.fingerprint}: {exc}") from None

        def read_bytes() -> bytes:
            try:
                return nofollow.read_bytes(self.root, *parts, BACKBONE_TENSORS_NAME)
            except FileNotFoundError:
                raise StoreCorrupt(f"backbone {record.fingerprint}: its tensor file is missing") from None

        return StoredBackbone(manifest, read_bytes)

    # -- writing (under the lock) --------------------------------------------------------------------
    def _put(self, artifact: ValidatedArtifact, activate: bool, *, only_if_new: bool) -> int | None:
        domain, files = domain_objects(artifact)
        with self._writing() as index:
            key = uuid.uuid4().hex
            record = VersionRecord(key=key, bytes=sum(len(b) for b in files.values()))
            version = index.add_version(
                domain,
                record,
                fingerprint=artifact.manifest.backbone_fingerprint,
                activate=activate,
                quotas=self.quotas,
                only_if_new=only_if_new,
            )
            if version is None:
                return None
            self._sweep_orphans(index, domain)
            self._publish(self._stage(files), ("domains", domain, key))
            self._commit(index)
            return version

    def activate(self, domain: str, version: int) -> None:
        with self._writing() as index:
            nofollow.refuse_symlinks(self.root, "domains", domain)
            if index.activate(domain, version):
                self._commit(index)

    def rollback(self, domain: str) -> int:
        with self._writing() as index:
            version = index.rollback(domain)
            self._commit(index)
            return version

    def delete_version(self, domain: str, version: int) -> None:
        with self._writing() as index:
            record = index.remove_version(domain, version)
            nofollow.refuse_symlinks(self.root, "domains", domain, record.key)
            self._commit(index)
            # Files go after the index no longer lists them; a crash here leaves an orphan, swept later.
            nofollow.remove_tree(self.root, "domains", domain, record.key)

    def delete_domain(self, domain: str) -> None:
        with self._writing() as index:
            index.remove_domain(domain)
            nofollow.refuse_symlinks(self.root, "domains", domain)
            self._commit(index)
            nofollow.remove_tree(self.root, "domains", domain)

    def put_backbone(self, artifact: ValidatedBackbone) -> None:
        files = backbone_objects(artifact)
        with self._writing() as index:
            if index.backbone is not None and index.backbone.fingerprint == artifact.manifest.fingerprint:
                return
            self._sweep_tmp()
            key = uuid.uuid4().hex
            record = BackboneRecord(
                fingerprint=artifact.manifest.fingerprint, key=key, bytes=sum(len(b) for b in files.values())
            )
            old = index.set_backbone(record, self.quotas)
            for name in nofollow.list_dir(self.root, "backbones"):  # orphans of interrupted put_backbones
                if old is None or name != old.key:
                    nofollow.remove_tree(self.root, "backbones", name)
            self._publish(self._stage(files), ("backbones", key))
            self._commit(index)
            if old is not None:
                nofollow.remove_tree(self.root, "backbones", old.key)

    def restore_domain(self, info: DomainVersions, read: ReadVersion) -> None:
        with self._writing() as index:
            index.ensure_never_existed(info.domain)  # refuse before anything is written
            self._sweep_orphans(index, info.domain)
            records: dict[int, VersionRecord] = {}
            for version in info.versions:
                files = restored_objects(info.domain, version, *read(version))
                key = uuid.uuid4().hex
                self._publish(self._stage(files), ("domains", info.domain, key))
                records[version] = VersionRecord(key=key, bytes=sum(len(b) for b in files.values()))
            index.restore_domain(info, records, self.quotas)
            self._commit(index)

    # -- checking ------------------------------------------------------------------------------------
    def verify(self) -> list[Problem]:
        """Check the index and every listed version (manifest parses, names itself, checksum matches).

        An empty list means the store is consistent. Unlisted directories (orphans of interrupted
        writes) are not problems: nothing refers to them and the next writer removes them.
        """
        return [*self._read_index().problems(), *verify_objects(self)]

    def collect_garbage(self, min_age: timedelta = timedelta(hours=1)) -> list[str]:
        """Delete what interrupted writes left behind (staging files, unlisted version and backbone
        directories) and return their paths below the root. Runs under the write lock, where no writer
        is mid-put, so the age guard ``S3Store`` needs is not needed here (``min_age`` is ignored)."""
        del min_age
        removed: list[str] = []
        with self._writing() as index:
            listed = index.object_keys()
            candidates = [("tmp", name) for name in nofollow.list_dir(self.root, "tmp")]
            candidates += [("backbones", n) for n in nofollow.list_dir(self.root, "backbones")]
            for domain in nofollow.list_dir(self.root, "domains"):
                candidates += [
                    (f"domains/{domain}", n) for n in nofollow.list_dir(self.root, "domains", domain)
                ]
            for kind, name in candidates:
                if kind == "tmp" or (kind, name) not in listed:
                    nofollow.remove_tree(self.root, *kind.split("/"), name)
                    removed.append(f"{kind}/{name}")
            for domain in nofollow.list_dir(self.root, "domains"):
                if domain not in index.domains and not nofollow.list_dir(self.root, "domains", domain):
                    nofollow.remove_tree(self.root, "domains", domain)
        return removed

    # -- internals -----------------------------------------------------------------------------------
    def _fault(self, step: str) -> None:
        if self._fault_hook is not None:
            self._fault_hook(step)

    def _read_index(self) -> StoreIndex:
        try:
            data = nofollow.read_bytes(self.root, INDEX_NAME)
        except FileNotFoundError:
            return StoreIndex()
        try:
            return StoreIndex.model_validate_json(data)
        except ValidationError as exc:
            legacy = self._read_format1(data)
            if legacy is None:
                raise StoreCorrupt(f"{self.root / INDEX_NAME} does not parse: {exc}") from None
            return legacy

    def _read_format1(self, data: bytes) -> StoreIndex | None:
        try:
            if json.loads(data).get("format", 1) != 1:
                return None
            old = _Format1Index.model_validate_json(data)
        except (ValueError, AttributeError):
            return None

        def size(*parts: str) -> int:
            total = 0
            for name in nofollow.list_dir(self.root, *parts):
                total += nofollow.file_size(self.root, *parts, name)
            return total

        index = StoreIndex(revision=old.revision, next_version=dict(old.next_version))
        for domain, entry in old.domains.items():
            versions = {
                v: VersionRecord(key=f"v{v}", bytes=size("domains", domain, f"v{v}")) for v in entry.versions
            }
            index.domains[domain] = DomainRecord(
                versions=versions, active=entry.active, previous=entry.previous
            )
        if old.backbone is not None:
            index.backbone = BackboneRecord(
                fingerprint=old.backbone, key=old.backbone, bytes=size("backbones", old.backbone)
            )
        return index

    @contextmanager
    def _writing(self) -> Iterator[StoreIndex]:
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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
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

    def _publish(self, staging: Path, parts: tuple[str, ...]) -> None:
        target = self.root.joinpath(*parts)
        parent_existed = target.parent.exists()
        nofollow.make_dirs(self.root, *parts[:-1])
        if not parent_existed:
            _fsync_dir(target.parent.parent)
        os.rename(staging, target)
        self._fault("published")
        _fsync_dir(target.parent)

    def _commit(self, index: StoreIndex) -> None:
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

    def _sweep_orphans(self, index: StoreIndex, domain: str) -> None:
        """Remove what interrupted writes left behind: staging files and unlisted version directories."""
        self._sweep_tmp()
        entry = index.domains.get(domain)
        listed = {r.key for r in entry.versions.values()} if entry is not None else set()
        for name in nofollow.list_dir(self.root, "domains", domain):
            if name not in listed:
                nofollow.remove_tree(self.root, "domains", domain, name)
