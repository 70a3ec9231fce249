"""``open_store``: the one place that turns a store's location (a directory or an ``s3://`` URL) into a store."""

from __future__ import annotations

from pathlib import Path

from adapters_store.index import StoreQuotas
from adapters_store.local import LocalStore
from adapters_store.store import AdapterStore

S3_SCHEME = "s3://"


def is_s3_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(S3_SCHEME)


def open_store(location: str | Path, *, quotas: StoreQuotas | None = None) -> AdapterStore:
    """``s3://bucket/prefix`` -> ``S3Store`` (endpoint and credentials from the usual ``AWS_*`` settings);
    anything else is a directory -> ``LocalStore``."""
    if is_s3_url(location):
        from adapters_store.s3 import S3Store  # boto3 is imported only by processes that use S3

        return S3Store.from_url(str(location), quotas=quotas)
    return LocalStore(Path(location), quotas=quotas)
