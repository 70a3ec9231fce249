"""Domains: list and describe (open), upload / activate / delete (admin token).

Uploads are validated against the running backbone (its spec and fingerprint) before anything is
stored; each creates a new immutable version. Store calls run in the thread pool (they take a file lock).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from adapters_store.bundle import unpack_bundle
from adapters_store.errors import ArtifactInvalid, Problem, VersionNotFound
from adapters_store.validation import validate_domain_artifact
from server.deps import RuntimeDep, require_admin, require_inference
from server.errors import BadRequest, UnsupportedMediaType
from server.runtime import Runtime
from server.schemas import (
    ActivateRequest,
    ActiveResponse,
    DeleteResponse,
    DomainDetail,
    DomainList,
    DomainSummary,
    UploadResponse,
    error_responses,
)

router = APIRouter(prefix="/v1/domains", tags=["domains"], responses=error_responses(401, 403, 404, 422, 503))
T = TypeVar("T")

_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "manifest": {"type": "string", "format": "binary", "description": "manifest.json"},
                        "tensors": {
                            "type": "string",
                            "format": "binary",
                            "description": "adapter.safetensors",
                        },
                        "bundle": {
                            "type": "string",
                            "format": "binary",
                            "description": "or: a bundle (.tar)",
                        },
                    },
                }
            },
            "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def _in_pool(runtime: Runtime, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(runtime.pool, fn, *args)


def _list(runtime: Runtime) -> DomainList:
    # One index read for every domain (describe per domain reparsed the index once each).
    summaries = [
        DomainSummary(
            domain=info.domain,
            versions=list(info.versions),
            active=info.active,
            resident=runtime.engine.is_resident(info.domain),
        )
        for info in runtime.store.describe_all()
    ]
    return DomainList(domains=summaries)


def _detail(runtime: Runtime, domain: str) -> DomainDetail:
    info = runtime.store.describe(domain)
    shown = info.active if info.active is not None else (info.versions[-1] if info.versions else None)
    manifest = None
    if shown is not None:
        try:
            manifest = runtime.store.get(domain, shown).manifest.model_dump(mode="json")
        except VersionNotFound:  # deleted between the two reads
            manifest = None
    resident_versions = sorted(k.version for k in runtime.engine.resident() if k.domain == domain)
    return DomainDetail(
        domain=domain,
        versions=list(info.versions),
        active=info.active,
        previous=list(info.previous),
        resident=bool(resident_versions),
        resident_versions=resident_versions,
        manifest=manifest,
    )


@router.get("", response_model=DomainList, dependencies=[Depends(require_inference)])
async def list_domains(runtime: RuntimeDep) -> DomainList:
    """Every stored domain: versions, the active one, and whether it is resident in the bank."""
    return await _in_pool(runtime, _list, runtime)


@router.get("/{domain}", response_model=DomainDetail, dependencies=[Depends(require_inference)])
async def describe_domain(runtime: RuntimeDep, domain: str) -> DomainDetail:
    """One domain: its versions, the active one, the active manifest and residency."""
    return await _in_pool(runtime, _detail, runtime, domain)


async def _upload_parts(request: Request) -> tuple[bytes, bytes, str | None, bool | None]:
    """(manifest bytes, tensor bytes, tensor file name, activate field) from multipart or a raw bundle."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in ("application/x-tar", "application/octet-stream"):
        manifest, tensors = unpack_bundle(await request.body())
        return manifest, tensors, None, None
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"unsupported content type {media_type or '(none)'!r}",
            accepted=["multipart/form-data", "application/x-tar"],
        )
    form = await request.form(max_files=3, max_fields=8)
    activate_field = form.get("activate")
    activate = None if not isinstance(activate_field, str) else activate_field.lower() in ("1", "true", "yes")
    bundle = form.get("bundle")
    if isinstance(bundle, UploadFile):
        manifest, tensors = unpack_bundle(await bundle.read())
        return manifest, tensors, None, activate
    manifest_part, tensor_part = form.get("manifest"), form.get("tensors")
    if tensor_part is None or manifest_part is None:
        raise BadRequest("multipart upload needs 'manifest' and 'tensors' parts (or one 'bundle')")
    manifest = (
        (await manifest_part.read()) if isinstance(manifest_part, UploadFile) else manifest_part.encode()
    )
    if not isinstance(tensor_part, UploadFile):
        raise BadRequest("'tensors' must be a file part (adapter.safetensors)")
    return manifest, await tensor_part.read(), tensor_part.filename, activate


def _validate_and_put(
    runtime: Runtime, domain: str, manifest: bytes, tensors: bytes, filename: str | None, activate: bool
) -> int:
    engine = runtime.engine
    validated = validate_domain_artifact(
        manifest,
        tensors,
        spec_for=engine.domain_spec,
        fingerprint=engine.fingerprint,
        limits=runtime.settings.artifact_limits(),
        filename=filename,
    )
    if validated.manifest.domain != domain:
        msg = f"the manifest is for domain {validated.manifest.domain!r}, uploaded to {domain!r}"
        raise ArtifactInvalid([Problem("manifest.domain", msg, "domain")])
    version = runtime.store.put(validated, activate=activate)
    engine.notice_store_change()
    return version


@router.post(
    "/{domain}/adapters",
    response_model=UploadResponse,
    responses=error_responses(400, 409, 413, 415),
    status_code=201,
    dependencies=[Depends(require_admin)],
    openapi_extra=_UPLOAD_DOC,
)
async def upload_adapter(
    request: Request,
    runtime: RuntimeDep,
    domain: str,
    activate: Annotated[bool | None, Query(description="Make the new version the active one")] = None,
) -> UploadResponse:
    """Upload a new version of a domain: multipart `manifest` + `tensors`, or a bundle (multipart `bundle`
    or a raw application/x-tar body). Refused with 422 and every reason when it does not fit the backbone."""
    manifest, tensors, filename, activate_field = await _upload_parts(request)
    do_activate = bool(activate if activate is not None else activate_field)
    version = await _in_pool(
        runtime, _validate_and_put, runtime, domain, manifest, tensors, filename, do_activate
    )
    return UploadResponse(domain=domain, version=version, active=do_activate)


async def _activate_request(request: Request) -> ActivateRequest:
    # Read here, not as a body parameter: FastAPI parses a declared body before it runs the route's
    # dependencies, so a malformed body without a token would get 422 instead of 401 (auth must come first).
    try:
        return ActivateRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
        ) from None


def _activate(runtime: Runtime, domain: str, body: ActivateRequest) -> int:
    if body.rollback:
        version = runtime.store.rollback(domain)
    else:
        assert body.version is not None
        runtime.store.activate(domain, body.version)
        version = body.version
    runtime.engine.notice_store_change()
    return version


@router.put(
    "/{domain}/active",
    response_model=ActiveResponse,
    responses=error_responses(400, 409),
    dependencies=[Depends(require_admin)],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ActivateRequest.model_json_schema()}},
        }
    },
)
async def set_active(request: Request, runtime: RuntimeDep, domain: str) -> ActiveResponse:
    """Switch the served version (`{"version": n}`) or roll back (`{"rollback": true}`).

    New requests use it at once; requests already queued finish on the version they started with."""
    body = await _activate_request(request)
    if (body.version is None) == (not body.rollback):
        raise BadRequest('give exactly one of {"version": n} or {"rollback": true}')
    version = await _in_pool(runtime, _activate, runtime, domain, body)
    return ActiveResponse(domain=domain, active=version)


def _delete(runtime: Runtime, domain: str, version: int | None) -> None:
    if version is None:
        runtime.store.delete_domain(domain)
    else:
        runtime.store.delete_version(domain, version)
    runtime.engine.notice_store_change()
    runtime.engine.evict(domain, version)


@router.delete(
    "/{domain}/versions/{version}",
    response_model=DeleteResponse,
    responses=error_responses(409),
    dependencies=[Depends(require_admin)],
)
async def delete_version(runtime: RuntimeDep, domain: str, version: int) -> DeleteResponse:
    """Delete one version (not the active one: 409)."""
    await _in_pool(runtime, _delete, runtime, domain, version)
    return DeleteResponse(domain=domain, deleted=[version])


@router.delete(
    "/{domain}",
    response_model=DeleteResponse,
    responses=error_responses(409),
    dependencies=[Depends(require_admin)],
)
async def delete_domain(runtime: RuntimeDep, domain: str) -> DeleteResponse:
    """Delete a domain and every version of it."""
    await _in_pool(runtime, _delete, runtime, domain, None)
    return DeleteResponse(domain=domain, deleted="all")
