"""The channel between front ends and engines: messages that cannot carry code, pixels in shared memory."""

from __future__ import annotations

import pickle
from pathlib import Path

import msgpack
import pytest

from server.errors import QueueFull
from server.protocol import BadMessage, decode, encode
from server.shm import PixelSlab, SlabReader
from server.wire_errors import from_wire, to_wire


class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # what a pickle payload would run on load


def test_a_pickle_payload_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "RAN"
    payload = pickle.dumps({"op": "classify", "obj": _Boom(marker)})
    with pytest.raises(BadMessage):
        decode(payload)
    # the same object inside a well-formed msgpack message: only its bytes travel, never rebuilt
    message = decode(encode({"op": "upload", "manifest": payload}))
    assert message["manifest"] == payload and not marker.exists()


def test_extension_types_and_non_messages_are_refused() -> None:
    with pytest.raises(BadMessage, match="extension"):
        decode(msgpack.packb({"op": "x", "v": msgpack.ExtType(1, b"\x80\x04")}))
    for value in ([1, 2], "op", {1: "int key"}, {"no": "op"}, b"\xc1"):
        with pytest.raises(BadMessage):
            decode(value if isinstance(value, bytes) else msgpack.packb(value))
    with pytest.raises(TypeError):
        encode({"op": "x", "obj": object()})  # only plain values can be sent


def test_errors_cross_as_their_own_type() -> None:
    err = from_wire(decode(encode(to_wire(QueueFull("full", retry_after=3))))["error"])
    assert isinstance(err, QueueFull) and err.retry_after == 3 and err.message == "full"
    unknown = from_wire({"kind": "os.system", "message": "m"})
    assert type(unknown).__name__ == "EngineError"


def test_slab_leases_are_disjoint_and_freed_ranges_merge() -> None:
    slab = PixelSlab.create(1 << 20)
    reader = SlabReader(untrack=False)  # the slab's creator is this process
    try:
        a, b = slab.lease(2, 24), slab.lease(3, 24)
        assert a is not None and b is not None
        assert a.offset + a.nbytes <= b.offset
        a.array[...] = 7
        b.array[...] = 9
        seen = reader.view(slab.name, b.offset, 3, 24)
        assert seen.shape == (3, 24, 24, 3) and (seen == 9).all()
        assert (reader.view(slab.name, a.offset, 2, 24) == 7).all()
        assert slab.lease(1, 1000) is None  # 3 MB does not fit a 1 MiB slab
        a.release()
        b.release()
        assert slab.free_bytes() == slab.size
        whole = slab.lease(1, 591)  # the merged free range holds one image of nearly the whole slab
        assert whole is not None and whole.offset == 0
        with pytest.raises(ValueError, match="outside"):
            reader.view(slab.name, slab.size - 10, 1, 24)
        with pytest.raises(ValueError, match="pixel slab"):
            reader.view("not-ours", 0, 1, 1)
    finally:
        reader.close()
        slab.close()


def test_store_errors_keep_their_type_and_details_across_the_channel() -> None:
    from adapters_store.errors import StoreQuotaExceeded, StoreSymlink

    quota = from_wire(decode(encode(to_wire(StoreQuotaExceeded("max_domains", 2, "over"))))["error"])
    assert isinstance(quota, StoreQuotaExceeded) and (quota.limit, quota.value) == ("max_domains", 2)
    assert isinstance(from_wire(to_wire(StoreSymlink("tmp is a symbolic link"))["error"]), StoreSymlink)
