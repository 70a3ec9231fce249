"""The test S3 server itself: every port on loopback, real conditional writes (what S3Store relies on)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from adapters_store.seaweedfs import SeaweedFS
from tests.conftest import BUCKET


def test_every_listening_socket_of_weed_is_on_loopback(seaweed: SeaweedFS) -> None:
    listening = seaweed.listening()
    assert ("127.0.0.1", seaweed.ports["s3.port"]) in listening
    assert len(listening) >= 4  # master, volume, filer, S3 at least (and their gRPC ports)
    assert {address for address, _ in listening} == {"127.0.0.1"}, listening


def test_conditional_writes_refuse_a_stale_etag_and_an_existing_key(seaweed: SeaweedFS) -> None:
    client, key = seaweed.client(), "conditional/probe.json"
    first = client.put_object(Bucket=BUCKET, Key=key, Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"2", IfNoneMatch="*")
    second = client.put_object(Bucket=BUCKET, Key=key, Body=b"2", IfMatch=first["ETag"])
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"3", IfMatch=first["ETag"])
    assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"2"
    assert second["ETag"] != first["ETag"]
