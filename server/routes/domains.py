"""Domains: list and describe (open), upload / activate / delete (admin token).

Every operation is the engine's (it owns the store and the model): uploads are validated against the
running backbone and trial-loaded there before anything is stored, each a new immutable version; the
front end streams the body within its limit and answers with the engine's verdict.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from adapters_store.bundle import unpack_bundle
from server.deps import FrontEndDep, VersionNumber, require_admin, require_inference
from server.errors import BadRequest, UnsupportedMediaType
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


@router.get("", response_model=DomainList, dependencies=[Depends(require_inference)])
async def list_domains(frontend: FrontEndDep) -> DomainList:
    """Every stored domain: versions, the active one, and whether it is resident in a bank."""
    return DomainList(domains=[DomainSummary(**d) for d in await frontend.engines.listing()])


@router.get("/{domain}", response_model=DomainDetail, dependencies=[Depends(require_inference)])
async def describe_domain(frontend: FrontEndDep, domain: str) -> DomainDetail:
    """One domain: its versions, the active one, the active manifest and residency."""
    detail = await frontend.engines.describe(domain)
    return DomainDetail(**detail, resident=bool(detail["resident_versions"]))


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
    frontend: FrontEndDep,
    domain: str,
    activate: Annotated[bool | None, Query(description="Make the new version the active one")] = None,
) -> UploadResponse:
    """Upload a new version of a domain: multipart `manifest` + `tensors`, or a bundle (multipart `bundle`
    or a raw application/x-tar body). Refused with 422 and every reason when it does not fit the backbone."""
    manifest, tensors, filename, activate_field = await _upload_parts(request)
    do_activate = bool(activate if activate is not None else activate_field)
    # Validated and trial-loaded by the engine (it alone has the model) before anything is stored.
    version = await frontend.engines.upload(domain, manifest, tensors, filename, do_activate)
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
async def set_active(request: Request, frontend: FrontEndDep, domain: str) -> ActiveResponse:
    """Switch the served version (`{"version": n}`) or roll back (`{"rollback": true}`).

    New requests use it at once; requests already queued finish on the version they started with."""
    body = await _activate_request(request)
    if (body.version is None) == (not body.rollback):
        raise BadRequest('give exactly one of {"version": n} or {"rollback": true}')
    version = await frontend.engines.activate(domain, None if body.rollback else body.version)
    return ActiveResponse(domain=domain, active=version)


@router.delete(
    "/{domain}/versions/{version}",
    response_model=DeleteResponse,
    responses=error_responses(409),
    dependencies=[Depends(require_admin)],
)
async def delete_version(frontend: FrontEndDep, domain: str, version: VersionNumber) -> DeleteResponse:
    """Delete one version (not the active one: 409)."""
    await frontend.engines.delete(domain, version)
    return DeleteResponse(domain=domain, deleted=[version])


@router.delete(
    "/{domain}",
    response_model=DeleteResponse,
    responses=error_responses(409),
    dependencies=[Depends(require_admin)],
)
async def delete_domain(frontend: FrontEndDep, domain: str) -> DeleteResponse:
    """Delete a domain and every version of it."""
    await frontend.engines.delete(domain, None)
    return DeleteResponse(domain=domain, deleted="all")
