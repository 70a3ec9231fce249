"""The single-file upload form of a domain artifact: an uncompressed tar of exactly
``manifest.json`` and ``adapter.safetensors``.

Read with ``tarfile`` from memory, never extracted: nothing in a hostile archive (links, ``../``
names, devices, huge sparse members) can touch the filesystem, and anything but the two regular
members is refused.
"""

from __future__ import annotations

import io
import tarfile

from adapters_store.errors import ArtifactInvalid, Problem
from adapters_store.limits import Limits
from adapters_store.manifest import DOMAIN_TENSORS_NAME, MANIFEST_NAME

_MAX_MEMBERS = 2


def pack_bundle(manifest_bytes: bytes, tensor_bytes: bytes) -> bytes:
    """Build a bundle. Deterministic (fixed mtime, owner and mode) so equal artifacts give equal bytes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((MANIFEST_NAME, manifest_bytes), (DOMAIN_TENSORS_NAME, tensor_bytes)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def unpack_bundle(data: bytes, *, limits: Limits = Limits()) -> tuple[bytes, bytes]:
    """Return ``(manifest_bytes, tensor_bytes)`` of a bundle; raise ``ArtifactInvalid`` if it is not one."""
    if len(data) > limits.max_bundle_bytes:
        msg = f"{len(data)} bytes exceed the limit of {limits.max_bundle_bytes}"
        raise ArtifactInvalid([Problem("bundle", msg, "too_large")])
    if data.startswith(b"PK\x03\x04") or data[:2] in (b"\x1f\x8b", b"BZ") or data[:6] == b"\xfd7zXZ\x00":
        msg = "not an uncompressed tar (zip, gzip, bzip2 or xz); pack the artifact with pack_bundle"
        raise ArtifactInvalid([Problem("bundle", msg, "bundle_format")])
    limit_of = {MANIFEST_NAME: limits.max_manifest_bytes, DOMAIN_TENSORS_NAME: limits.max_tensor_bytes}
    found: dict[str, bytes] = {}
    seen: set[str] = set()
    problems: list[Problem] = []
    try:
        # "r:" = uncompressed only; members are read one by one so a huge member list is never scanned.
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            count = 0
            while (member := tar.next()) is not None:
                count += 1
                if count > _MAX_MEMBERS:
                    problems.append(Problem("bundle", f"more than {_MAX_MEMBERS} members", "bundle_members"))
                    break
                problem = _check_member(member, seen, limit_of)
                seen.add(member.name)
                if problem is not None:
                    problems.append(problem)
                    continue
                stream = tar.extractfile(member)
                if stream is None:  # unreachable for regular files, but tarfile's type says it may be
                    problems.append(Problem(f"bundle/{member.name}", "unreadable member", "bundle_members"))
                    continue
                found[member.name] = stream.read()
    except Exception as exc:  # whatever tarfile trips over in hostile bytes, the answer is "not a bundle"
        raise ArtifactInvalid(
            [*problems, Problem("bundle", f"not a valid tar archive: {exc}", "bundle_format")]
        ) from None
    problems.extend(
        Problem("bundle", f"member {name} is missing", "bundle_members")
        for name in limit_of
        if name not in seen
    )
    if problems:
        raise ArtifactInvalid(problems)
    return found[MANIFEST_NAME], found[DOMAIN_TENSORS_NAME]


def _check_member(member: tarfile.TarInfo, seen: set[str], limit_of: dict[str, int]) -> Problem | None:
    field = f"bundle/{member.name[:80]!r}"
    if member.name not in limit_of:
        return Problem(
            field, f"unexpected member; a bundle holds only {', '.join(limit_of)}", "bundle_members"
        )
    if not member.isreg() or member.issparse():
        return Problem(
            field, "not a regular file (links, directories and devices are refused)", "bundle_members"
        )
    if member.name in seen:
        return Problem(field, "duplicated member", "bundle_members")
    if member.size > limit_of[member.name]:
        return Problem(field, f"{member.size} bytes exceed the limit of {limit_of[member.name]}", "too_large")
    return None
