"""Manifests: the JSON half of an artifact, as pydantic models.

A domain artifact is ``manifest.json`` (``DomainManifest``) + ``adapter.safetensors``; a backbone
artifact is ``manifest.json`` (``BackboneManifest``) + ``backbone.safetensors``. Models are strict
(no type coercion, unknown fields refused, no NaN) because a manifest arrives from the network.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    model_validator,
)

from adapters_store.errors import ArtifactInvalid, Problem
from adapters_store.strict_json import StrictJSONError, loads_strict
from domain_format.kinds import (
    DEFAULT_ALLOCATION,
    DEFAULT_POINTWISE_BUDGET,
    DEFAULT_RANK,
    KINDS_WITH_DEPTHWISE,
    AdapterKind,
)
from domain_format.preprocess import Channels, ImageSpec, Interpolation

FORMAT_VERSION: Literal[1] = 1
"""The format of backbone manifests and of domain artifacts without depthwise deltas. Bumped on any
incompatible change; readers refuse versions they do not know."""
DomainFormatVersion = Literal[1, 2]
"""Domain artifact formats this reader knows: 1, and 2 = an artifact that carries depthwise kernel deltas
(kind ``depthwise``: ``<unit>.depthwise.weight`` tensors), which a format-1 reader could not serve."""
DEPTHWISE_FORMAT_VERSION: Literal[2] = 2


def domain_format_version(kind: AdapterKind) -> DomainFormatVersion:
    """The format version a domain artifact of ``kind`` is written with (and must say it has): 2 for kinds
    with depthwise deltas, 1 for every other, so artifacts any earlier reader can serve keep format 1."""
    return DEPTHWISE_FORMAT_VERSION if kind in KINDS_WITH_DEPTHWISE else FORMAT_VERSION


MANIFEST_NAME = "manifest.json"
DOMAIN_TENSORS_NAME = "adapter.safetensors"
BACKBONE_TENSORS_NAME = "backbone.safetensors"

# ASCII only, fixed length, no dots or slashes: a domain name is used as a directory name and in URLs.
_DOMAIN_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}", re.ASCII)
_SHA256_PATTERN = r"^[0-9a-f]{64}$"


def is_safe_domain_name(name: object) -> bool:
    """True when ``name`` may be used as a domain name (and hence as a path component)."""
    return isinstance(name, str) and _DOMAIN_NAME_RE.fullmatch(name) is not None


def _check_domain_name(name: str) -> str:
    if not is_safe_domain_name(name):
        raise ValueError(
            "domain name must be 1-64 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
        )
    return name


# Line (Zl, U+2028) and paragraph (Zp, U+2029) separators break a log line or a CSV row as a newline
# does; C* are control, format (bidi overrides), private-use and unassigned characters.
_REFUSED_LABEL_CATEGORIES = ("C", "Zl", "Zp")


def _check_label(label: str) -> str:
    if not label.strip():
        raise ValueError("label is empty or blank")
    # Control characters in a label end up in logs and responses; nothing legitimate needs them.
    bad = sorted(
        {f"U+{ord(ch):04X}" for ch in label if unicodedata.category(ch).startswith(_REFUSED_LABEL_CATEGORIES)}
    )
    if bad:
        raise ValueError(f"label contains control, separator or unassigned characters: {', '.join(bad[:5])}")
    return label


def _label_key(label: str) -> str:
    """What two labels must not share: NFC normal form, surrounding whitespace trimmed. "café" typed
    precomposed and decomposed, or "cat" and "cat ", look the same to a reader of the response."""
    return unicodedata.normalize("NFC", label).strip()


def _check_unique(labels: list[str]) -> list[str]:
    by_key = Counter(_label_key(label) for label in labels)
    dups = sorted(key for key, count in by_key.items() if count > 1)
    if dups:
        raise ValueError(
            f"labels must be unique (compared in NFC form, surrounding whitespace trimmed); duplicated: {dups[:10]}"
        )
    return labels


DomainName = Annotated[str, AfterValidator(_check_domain_name)]
Sha256Hex = Annotated[str, StringConstraints(pattern=_SHA256_PATTERN)]
Label = Annotated[str, AfterValidator(_check_label)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=256)]
TensorDtype = Literal["float32", "float16"]

_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class AdapterSettings(BaseModel):
    """How the domain adapts the backbone: the kinds and defaults of ``domain_format.kinds``, the same
    names the model library's ``AdapterConfig`` is built from (``model_artifacts`` converts between them).
    ``kind`` has no default here: a manifest must say what it holds."""

    model_config = _STRICT

    kind: AdapterKind
    rank: int | None = Field(default=DEFAULT_RANK, ge=1)
    allocation: ShortText | Annotated[list[ShortText], Field(max_length=4096)] = DEFAULT_ALLOCATION
    pointwise_budget: float = Field(default=DEFAULT_POINTWISE_BUDGET, gt=0.0, le=1.0)
    unit_ranks: Annotated[dict[ShortText, Annotated[int, Field(ge=1)]], Field(max_length=4096)] = Field(
        default_factory=dict
    )


class Preprocessing(BaseModel):
    """What the server does to an image before the forward pass for this domain."""

    model_config = _STRICT

    input_size: int = Field(gt=0, le=4096)
    """Side of the square centre crop."""
    resize: int = Field(gt=0, le=8192)
    """Shorter side after resizing, before the centre crop."""
    mean: Annotated[list[float], Field(min_length=3, max_length=3)]
    std: Annotated[list[Annotated[float, Field(gt=0.0)]], Field(min_length=3, max_length=3)]
    channels: Channels
    """``grayscale`` images are replicated to 3 channels by the server."""
    interpolation: Interpolation = "bilinear"

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocessing:
        if self.resize < self.input_size:
            raise ValueError(f"resize ({self.resize}) is smaller than input_size ({self.input_size})")
        return self

    def image_spec(self) -> ImageSpec:
        """What ``domain_format.preprocess`` needs to make this domain's uint8 pixels (mean/std apart)."""
        return ImageSpec(self.input_size, self.resize, self.channels, self.interpolation)


class Provenance(BaseModel):
    """Where the adapter came from; informational, shown by ``store show`` and the API."""

    model_config = _STRICT

    dataset: ShortText
    epochs: int = Field(ge=0)
    val_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    """Top-1 validation accuracy as a fraction in [0, 1] (not percent)."""
    created_at: AwareDatetime


class DomainManifest(BaseModel):
    """manifest.json of a domain artifact."""

    model_config = _STRICT

    format_version: DomainFormatVersion = FORMAT_VERSION
    """1, or 2 for an artifact with depthwise deltas (``domain_format_version`` of its kind: exactly)."""
    domain: DomainName
    version: int = Field(default=0, ge=0)
    """Assigned by the store on put; 0 (or absent) in an uploaded manifest."""
    labels: Annotated[list[Label], AfterValidator(_check_unique), Field(min_length=1)]
    """Class labels in head order; their count must equal the head's output size."""
    backbone: ShortText
    """Name of the backbone the adapter was trained on (e.g. ``resnet26``)."""
    backbone_fingerprint: Sha256Hex
    """The backbone's fingerprint (lowercase hex sha256); must match the running backbone."""
    adapter: AdapterSettings
    preprocessing: Preprocessing
    provenance: Provenance
    sha256: Sha256Hex
    """sha256 of adapter.safetensors (lowercase hex)."""
    dtype: TensorDtype = "float32"
    """Floating dtype of every tensor; a spec's ``float32`` means this dtype."""

    @model_validator(mode="after")
    def _format_fits_kind(self) -> DomainManifest:
        needed = domain_format_version(self.adapter.kind)
        if self.format_version != needed:
            raise ValueError(
                f"format_version {self.format_version} does not fit adapter kind {self.adapter.kind!r}, "
                f"which is format {needed} (format 2 is exactly the artifacts with depthwise deltas)"
            )
        return self


class ArchitectureConfig(BaseModel):
    """``create_backbone(name, **kwargs)`` arguments."""

    model_config = _STRICT

    name: ShortText
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)


class BackboneManifest(BaseModel):
    """manifest.json of a backbone artifact (the shared, frozen weights)."""

    model_config = _STRICT

    format_version: Literal[1] = FORMAT_VERSION
    name: ShortText
    architecture: ArchitectureConfig
    fingerprint: Sha256Hex
    """What domain manifests name in ``backbone_fingerprint``."""
    sha256: Sha256Hex
    """sha256 of backbone.safetensors (lowercase hex)."""
    created_at: AwareDatetime | None = None


ManifestT = TypeVar("ManifestT", DomainManifest, BackboneManifest)


def _loc(parts: tuple[int | str, ...]) -> str:
    out = "manifest"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _parse(model: type[ManifestT], data: bytes) -> ManifestT:
    # Our own strict pass first: pydantic's JSON parser keeps the last duplicated key silently.
    try:
        obj = loads_strict(data)
    except StrictJSONError as exc:
        code = "duplicate_key" if "duplicated key" in str(exc) else "json"
        raise ArtifactInvalid([Problem("manifest", str(exc), code)]) from None
    if not isinstance(obj, dict):
        raise ArtifactInvalid([Problem("manifest", "must be a JSON object", "json")])
    try:
        # JSON mode so strict models still read ISO datetimes from strings.
        return model.model_validate_json(data)
    except ValidationError as exc:
        problems = [
            Problem(_loc(err["loc"]), err["msg"].removeprefix("Value error, "), "schema")
            for err in exc.errors()
        ]
        raise ArtifactInvalid(problems) from None


def parse_domain_manifest(data: bytes) -> DomainManifest:
    """Parse manifest.json of a domain artifact; raises ``ArtifactInvalid`` listing every schema error."""
    return _parse(DomainManifest, data)


def parse_backbone_manifest(data: bytes) -> BackboneManifest:
    """Parse manifest.json of a backbone artifact; raises ``ArtifactInvalid`` listing every schema error."""
    return _parse(BackboneManifest, data)


def manifest_to_json(manifest: DomainManifest | BackboneManifest) -> bytes:
    """The canonical serialisation written into artifacts and the store."""
    return (manifest.model_dump_json(indent=2) + "\n").encode("utf-8")
