"""``S3Store``: the versioned store in an S3 bucket, shared by replicas on many hosts.

Layout below ``s3://bucket/prefix/``::

    index.json                                  the only mutable object (``StoreIndex``, format 2)
    domains/<domain>/<key>/adapter.safetensors  one immutable version per unique key (a uuid)
    domains/<domain>/<key>/manifest.json
    backbones/<key>/backbone.safetensors, manifest.json

The same consistency argument as ``LocalStore``, with a conditional write in place of the file lock:

- A put uploads its objects under a fresh uuid key first (nobody else can name that key, so two
  writers can never overwrite each other's objects), then swaps the index with a conditional PUT:
  ``If-Match: <the ETag it read>`` (``If-None-Match: *`` when there is no index yet). If another
  writer swapped it in between, S3 answers 412 and the put re-reads the index and re-applies its
  change: the version number is assigned by that re-applied change (``StoreIndex.add_version``), so
  concurrent writers never lose a version and never share a number.
- A writer killed before its index swap leaves only unlisted objects (never visible; ``collect_garbage``
  removes them once they are old enough that no live writer can still be about to list them).
- The revision a replica polls is the index object's ETag (one HEAD request).

Endpoint, region and credentials come from boto3's usual settings (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, config files...). The bucket must exist.
"""

from __future__ import annotations

import functools
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from adapters_store.errors import (
    ArtifactInvalid,
    BackboneNotFound,
    Problem,
    StoreBusy,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    VersionNotFound,
)
from adapters_store.index import BackboneRecord, DomainVersions, StoreIndex, StoreQuotas, VersionRecord
from adapters_store.manifest import (
    BACKBONE_TENSORS_NAME,
    DOMAIN_TENSORS_NAME,
    MANIFEST_NAME,
    parse_backbone_manifest,
)
from adapters_store.objects import backbone_objects, domain_objects, restored_objects, stored_manifest
from adapters_store.store import PutByPrimitive, ReadVersion, StoredBackbone, StoredDomain, verify_objects
from adapters_store.validation import ValidatedArtifact, ValidatedBackbone

_T = TypeVar("_T")
FaultHook = Callable[[str], None]
"""Called at each step of a write (``begin`` of a put, ``write:<object>``, ``staged``, ``index-read``,
``index-written``);
the crash tests kill the writer there. None in production."""

INDEX_NAME = "index.json"
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict", "412"}


_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
)


@functools.lru_cache(maxsize=8)
def _client_for(environment: tuple[str | None, ...]) -> Any:
    del environment  # the cache key: boto3 reads the same variables itself
    config = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=60)
    return boto3.session.Session().client("s3", config=config)


class _Unchanged:
    """Returned by an index change that found nothing to do (no commit, no new revision)."""


UNCHANGED = _Unchanged()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """botocore's errors as the store's own: an unreachable or refusing endpoint is ``StoreUnavailable``."""
    try:
        yield
    except ClientError as exc:
        raise StoreUnavailable(f"S3 {what} failed: {_code(exc)}: {exc}") from None
    except BotoCoreError as exc:
        raise StoreUnavailable(f"S3 {what} failed: {exc}") from None


class S3Store(PutByPrimitive):
    """``AdapterStore`` on an S3 bucket (any S3-compatible server with conditional writes)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        quotas: StoreQuotas | None = None,
        fault_hook: FaultHook | None = None,
        commit_attempts: int = 64,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.quotas = quotas if quotas is not None else StoreQuotas()
        self._client = client if client is not None else self.make_client()
        self._fault_hook = fault_hook
        self._commit_attempts = commit_attempts

    @staticmethod
    def make_client() -> Any:
        """A boto3 S3 client from the environment; one per distinct ``AWS_*`` setting in a process
        (clients are thread-safe, and making one costs tens of milliseconds)."""
        return _client_for(tuple(os.environ.get(name) for name in _CLIENT_ENV))

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Store:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or len(parsed.netloc) < 3:
            raise ValueError(f"{url!r} is not s3://bucket[/prefix] (bucket names have 3 or more characters)")
        return cls(parsed.netloc, parsed.path, **kwargs)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    # -- reading -------------------------------------------------------------------------------------
    def revision(self) -> str:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(INDEX_NAME))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return "0"
            raise StoreUnavailable(f"S3 revision failed: {_code(exc)}: {exc}") from None
        except BotoCoreError as exc:
            raise StoreUnavailable(f"S3 revision failed: {exc}") from None
        return str(head["ETag"])

    def list_domains(self) -> list[str]:
        return sorted(self._read_index()[0].domains)

    def describe(self, domain: str) -> DomainVersions:
        return self._read_index()[0].describe(domain)

    def describe_all(self) -> list[DomainVersions]:
        return self._read_index()[0].describe_all()

    def get(self, domain: str, version: int | None = None) -> StoredDomain:
        number, record = self._read_index()[0].resolve(domain, version)
        base = f"domains/{domain}/{record.key}"
        data = self._get_object(f"{base}/{MANIFEST_NAME}", f"domain {domain!r} version {number} was deleted")
        manifest = stored_manifest(data, domain, number, f"{self.url}/{base}")
        missing = f"{domain} v{number} was deleted"
        return StoredDomain(manifest, lambda: self._get_object(f"{base}/{DOMAIN_TENSORS_NAME}", missing))

    def get_backbone(self) -> StoredBackbone:
        record = self._read_index()[0].backbone
        if record is None:
            raise BackboneNotFound(f"no backbone in {self.url}")
        base = f"backbones/{record.key}"
        try:
            manifest = parse_backbone_manifest(self._get_object(f"{base}/{MANIFEST_NAME}", "it is missing"))
        except (VersionNotFound, ArtifactInvalid) as exc:
            raise StoreCorrupt(f"backbone {record.fingerprint}: {exc}") from None

        def read_bytes() -> bytes:
            try:
                return self._get_object(f"{base}/{BACKBONE_TENSORS_NAME}", "")
            except VersionNotFound:  # the index lists it: not a client's 404 but a damaged store
                raise StoreCorrupt(f"backbone {record.fingerprint}: its tensor object is missing") from None

        return StoredBackbone(manifest, read_bytes)

    # -- writing -------------------------------------------------------------------------------------
    def _put(self, artifact: ValidatedArtifact, activate: bool, *, only_if_new: bool) -> int | None:
        domain, files = domain_objects(artifact)
        record = VersionRecord(key=uuid.uuid4().hex, bytes=sum(len(b) for b in files.values()))

        def add(index: StoreIndex) -> int | _Unchanged | None:
            version = index.add_version(
                domain,
                record,
                fingerprint=artifact.manifest.backbone_fingerprint,
                activate=activate,
                quotas=self.quotas,
                only_if_new=only_if_new,
            )
            return UNCHANGED if version is None else version

        # Refuse (quota, backbone, already bootstrapped) before uploading anything, on the index as it is.
        if add(self._read_index()[0]) is UNCHANGED:
            return None
        self._fault("begin")
        base = f"domains/{domain}/{record.key}"
        self._upload(base, files)
        try:
            result = self._update(add)
        except BaseException:
            self._discard_unless_listed(f"domains/{domain}", record.key, files)
            raise
        if isinstance(result, _Unchanged):  # another writer made the domain's first version meanwhile
            self._discard_unless_listed(f"domains/{domain}", record.key, files)
            return None
        return result

    def activate(self, domain: str, version: int) -> None:
        self._update(lambda index: None if index.activate(domain, version) else UNCHANGED)

    def rollback(self, domain: str) -> int:
        result = self._update(lambda index: index.rollback(domain))
        assert isinstance(result, int)
        return result

    def delete_version(self, domain: str, version: int) -> None:
        record = self._update(lambda index: index.remove_version(domain, version))
        assert isinstance(record, VersionRecord)
        # Objects go after the index no longer lists them; exactly this version's keys, never a prefix
        # (another writer may be uploading a new version of the same domain right now).
        self._delete_version_objects(domain, [record])

    def delete_domain(self, domain: str) -> None:
        records = self._update(lambda index: index.remove_domain(domain))
        assert isinstance(records, list)
        self._delete_version_objects(domain, records)

    def put_backbone(self, artifact: ValidatedBackbone) -> None:
        fingerprint = artifact.manifest.fingerprint
        if (current := self._read_index()[0].backbone) is not None and current.fingerprint == fingerprint:
            return
        files = backbone_objects(artifact)
        record = BackboneRecord(
            fingerprint=fingerprint, key=uuid.uuid4().hex, bytes=sum(map(len, files.values()))
        )

        def replace(index: StoreIndex) -> BackboneRecord | _Unchanged | None:
            if index.backbone is not None and index.backbone.fingerprint == fingerprint:
                return UNCHANGED  # another replica bootstrapped the same backbone meanwhile
            return index.set_backbone(record, self.quotas)

        self._upload(f"backbones/{record.key}", files)
        try:
            old = self._update(replace)
        except BaseException:
            self._discard_unless_listed("backbones", record.key, files)
            raise
        if isinstance(old, _Unchanged):
            self._discard_unless_listed("backbones", record.key, files)
        elif isinstance(old, BackboneRecord):
            self._delete_objects([f"backbones/{old.key}/{name}" for name in files])

    def restore_domain(self, info: DomainVersions, read: ReadVersion) -> None:
        self._read_index()[0].ensure_never_existed(info.domain)
        records: dict[int, VersionRecord] = {}
        names = (DOMAIN_TENSORS_NAME, MANIFEST_NAME)
        try:
            for version in info.versions:
                files = restored_objects(info.domain, version, *read(version))
                records[version] = VersionRecord(key=uuid.uuid4().hex, bytes=sum(map(len, files.values())))
                self._upload(f"domains/{info.domain}/{records[version].key}", files)
            self._update(lambda index: index.restore_domain(info, records, self.quotas))
        except BaseException:
            for record in records.values():
                self._discard_unless_listed(f"domains/{info.domain}", record.key, names)
            raise

    # -- checking and maintenance --------------------------------------------------------------------
    def verify(self) -> list[Problem]:
        """The index's own problems and every listed object's; unlisted objects are not problems."""
        return [*self._read_index()[0].problems(), *verify_objects(self)]

    def collect_garbage(self, min_age: timedelta = timedelta(hours=1)) -> list[str]:
        """Delete objects no index lists that are older than ``min_age`` (left by killed writers); return
        their keys. The age guard keeps the objects of a put still on its way to the index swap."""
        index = self._read_index()[0]
        listed = {f"{kind}/{key}/" for kind, key in index.object_keys()}
        cutoff = datetime.now(UTC) - min_age
        orphans: list[str] = []
        with _s3_errors("list"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix) :]
                    kind = rel.split("/", 1)[0]
                    if kind not in ("domains", "backbones") or obj["LastModified"] > cutoff:
                        continue
                    if not any(rel.startswith(p) for p in listed):
                        orphans.append(rel)
        self._delete_objects(orphans)
        return orphans

    # -- internals -----------------------------------------------------------------------------------
    def _key(self, rel: str) -> str:
        return self.prefix + rel

    def _fault(self, step: str) -> None:
        if self._fault_hook is not None:
            self._fault_hook(step)

    def _get_object(self, rel: str, missing: str) -> bytes:
        try:
            return bytes(self._client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read())
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                raise VersionNotFound(missing) from None
            raise StoreUnavailable(f"S3 get {rel} failed: {_code(exc)}: {exc}") from None
        except BotoCoreError as exc:
            raise StoreUnavailable(f"S3 get {rel} failed: {exc}") from None

    def _read_index(self) -> tuple[StoreIndex, str | None]:
        """The index and its ETag (None: no index yet, an empty store)."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(INDEX_NAME))
            data = response["Body"].read()
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return StoreIndex(), None
            raise StoreUnavailable(f"S3 index read failed: {_code(exc)}: {exc}") from None
        except BotoCoreError as exc:
            raise StoreUnavailable(f"S3 index read failed: {exc}") from None
        try:
            return StoreIndex.model_validate_json(data), str(response["ETag"])
        except ValidationError as exc:
            raise StoreCorrupt(f"{self.url}/{INDEX_NAME} does not parse: {exc}") from None

    def _upload(self, base: str, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            with _s3_errors(f"put {base}/{name}"):
                # If-None-Match: an object is written once; a key collision would fail, never overwrite.
                self._client.put_object(
                    Bucket=self.bucket, Key=self._key(f"{base}/{name}"), Body=data, IfNoneMatch="*"
                )
            self._fault(f"write:{name}")
        self._fault("staged")

    def _update(self, change: Callable[[StoreIndex], _T]) -> _T:
        """Apply ``change`` to a fresh index and swap it in with a conditional write; on a lost race
        re-read and re-apply. ``change`` raises to refuse and returns ``UNCHANGED`` to skip the write."""
        for attempt in range(self._commit_attempts):
            index, etag = self._read_index()
            self._fault("index-read")
            result = change(index)
            if isinstance(result, _Unchanged):
                return result
            index.revision += 1
            condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
            try:
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(INDEX_NAME),
                    Body=index.model_dump_json().encode("utf-8"),
                    ContentType="application/json",
                    **condition,
                )
            except ClientError as exc:
                if _code(exc) not in _LOST_RACE:
                    raise StoreUnavailable(f"S3 index write failed: {_code(exc)}: {exc}") from None
                # Another writer swapped the index first: back off a little (jittered, so two writers
                # do not collide again in lockstep), then re-read and re-apply.
                time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))
                continue
            except BotoCoreError as exc:
                raise StoreUnavailable(f"S3 index write failed: {exc}") from None
            self._fault("index-written")
            return result
        raise StoreBusy(f"{self.url}: the index changed under {self._commit_attempts} attempts in a row")

    def _discard_unless_listed(self, kind: str, key: str, names: Iterable[str]) -> None:
        """Delete a failed write's objects, unless the index lists them after all (a write whose answer
        was lost may have landed); when even that cannot be read, leave them to ``collect_garbage``."""
        try:
            listed = (kind, key) in self._read_index()[0].object_keys()
        except StoreError:
            return
        if not listed:
            self._delete_objects([f"{kind}/{key}/{name}" for name in names])

    def _delete_version_objects(self, domain: str, records: list[VersionRecord]) -> None:
        names = (MANIFEST_NAME, DOMAIN_TENSORS_NAME)
        self._delete_objects([f"domains/{domain}/{r.key}/{n}" for r in records for n in names])

    def _delete_objects(self, rels: list[str]) -> None:
        """Best effort: an object left behind is unlisted and ``collect_garbage`` removes it later."""
        for start in range(0, len(rels), 1000):
            chunk = [{"Key": self._key(rel)} for rel in rels[start : start + 1000]]
            with suppress(ClientError, BotoCoreError):
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})
