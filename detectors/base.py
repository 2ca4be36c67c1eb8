"""The one small interface every detector plugin implements.

Modelled on python-threatexchange's split between *what a signal is* and *how
it is indexed*: a detector turns one image into zero or more `Evidence` items;
fusion (``detectors.fusion``) turns a bag of evidence into a cluster's score.
Detectors register under a stable name so configuration, evidence and
evaluation reports can refer to them.
"""

from __future__ import annotations

import abc
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from detectors.printable import escaped

if TYPE_CHECKING:  # annotations only: evidence records need no image code
    from detectors.imagedata import ImageData

# "cheap" detectors run on every new member image of a cluster (metadata can
# survive on one repost and not another); "model" detectors are expensive and
# run once per cluster, in the separately scaled detect worker role.
Cost = Literal["cheap", "model"]


class EvidenceKind(str, Enum):
    """What sort of signal an evidence item is; set by the detector that made it.

    Fusion and cluster seeding decide by kind, never by detector name:
    ``model`` and ``vendor`` are learned pixel classifiers (damped when
    provenance is decisive), ``bank`` carries a fact-check verdict,
    ``metadata``/``provenance``/``watermark`` are facts read from the file.
    """

    METADATA = "metadata"
    PROVENANCE = "provenance"
    WATERMARK = "watermark"
    BANK = "bank"
    MODEL = "model"
    VENDOR = "vendor"

    @property
    def learned(self) -> bool:
        """A statistical pixel classifier's opinion rather than a fact in the file."""
        return self in (EvidenceKind.MODEL, EvidenceKind.VENDOR)


# Records written before ``kind`` existed named their sort in the detector
# name; this mapping is used ONLY to read those old records (see
# ``Evidence._legacy_kind``), never to decide behaviour for new evidence.
_LEGACY_PREFIX_KIND = {"model:": EvidenceKind.MODEL, "vendor:": EvidenceKind.VENDOR, "bank:": EvidenceKind.BANK}
_LEGACY_NAME_KIND = {"c2pa": EvidenceKind.PROVENANCE, "xmp": EvidenceKind.PROVENANCE,
                     "invisible-watermark": EvidenceKind.WATERMARK}


class Evidence(BaseModel):
    """One detector's finding about one image.

    ``score`` is the detector's probability that the picture is AI-generated or
    manipulated (0 = confidently authentic, 0.5 = no opinion, 1 = AI).
    ``weight`` says how decisive the finding is (a signed C2PA manifest or an
    exact generator text chunk is near-conclusive; a model logit is not).

    Both are finite numbers, the weight not negative: an infinite weight
    made fusion's score NaN (at a score of 0.5, or against an opposing
    infinite weight) and a negative one turns a finding around. Nothing
    stored carries one: records travel as Pydantic JSON, which writes a
    non-finite number as ``null`` (never loadable as a score or weight),
    and the cluster stage refused ops with non-finite evidence before this
    record did, so no cluster state or findings row got one.
    """

    detector: str
    kind: EvidenceKind = EvidenceKind.METADATA
    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    detail: str
    weight: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    sha256: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("detail")
    @classmethod
    def _showable(cls, v: str) -> str:
        # Detail is often text read from the picture's metadata, shown on
        # terminals, in logs and in webhook summaries: an ESC or CR in a
        # generator's "Model:" field rewrote the operator's ALERT line.
        return escaped(v)

    @model_validator(mode="before")
    @classmethod
    def _legacy_kind(cls, raw: Any) -> Any:
        # Stored clusters and findings from before ``kind`` carry no kind:
        # recover it from the name scheme they were written with.
        if isinstance(raw, dict) and raw.get("kind") is None and isinstance(raw.get("detector"), str):
            name = raw["detector"]
            kind = _LEGACY_NAME_KIND.get(name) or next(
                (k for p, k in _LEGACY_PREFIX_KIND.items() if name.startswith(p)), EvidenceKind.METADATA)
            raw = {**raw, "kind": kind}
        return raw


class Detector(abc.ABC):
    name: ClassVar[str]
    cost: ClassVar[Cost] = "cheap"
    version: ClassVar[str] = "1"
    #: the kind stamped on this detector's evidence (see ``EvidenceKind``)
    kind: ClassVar[EvidenceKind] = EvidenceKind.METADATA

    @abc.abstractmethod
    def analyze(self, image: ImageData) -> list[Evidence]:
        """Return evidence found in ``image``; an empty list means nothing found.

        Must never raise for a merely unusual image: undecodable input is the
        caller's problem (``ImageData`` raises ``ImageRejected`` before this).
        """


_REGISTRY: dict[str, Callable[[], Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector available by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"detector {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def create(name: str) -> Detector:
    _load_builtin_plugins()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise KeyError(f"unknown detector {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def create_all(cost: Cost | None = None, names: list[str] | None = None) -> list[Detector]:
    _load_builtin_plugins()
    chosen = names if names is not None else sorted(_REGISTRY)
    detectors = [create(n) for n in chosen]
    return [d for d in detectors if cost is None or d.cost == cost]


def known_detectors(cost: Cost | None = None) -> set[str]:
    """Names of the registered detectors (of ``cost``, when given)."""
    _load_builtin_plugins()
    return {name for name, cls in _REGISTRY.items() if cost is None or cls.cost == cost}


def _load_builtin_plugins() -> None:
    # Importing the modules runs their @register decorators.
    import detectors.plugins  # noqa: F401
