"""Signal types: the one small typed interface every perceptual hash sits behind.

Modelled on python-threatexchange's ``SignalType`` (``get_name``,
``validate_signal_str``, ``compare_hash``, ``get_index_cls``) and its split
between *what a signal is* and *how it is indexed*, as ``detectors.base`` is
for detectors: a ``SignalType`` says what a hash looks like (``bits``,
``hex_len``, ``validate``), how two compare (``distance``, the default match
``default_threshold``), where an ``ImageHashes`` record carries it (``fields``:
the full and the mirrored code, ``values``), whether it carries a quality
(``has_quality``) or crop/screenshot views (``has_views``), how a shared hash
list names its column (``csv_aliases``) and how a person calls it (``label``).
Consumers (bank import, validation and matching, op validation in
``streams.clustering``, the bank CLI's help) iterate over ``signal_types()``
instead of naming "pdq" and "phash". What a match's ``via`` says -- which
kind of copy, by which type's hash -- is ``describe_via``'s, read from the
registry: the desk (``streams.desk.views.match_words``) and bank evidence
(``detectors.banks.bank_evidence``) word their text from it.

PDQ (256 bit, with a quality) and pHash (64 bit, with views) are the two
built-ins. Their *computation* stays one fused pass from one thumbnail
(``detectors.hashing.compute_hashes``) and their record stays
``ImageHashes``: a signal type reads hashes, it does not compute them.

Specialised on purpose: the clustering index's vectorised search
(``detectors.neardup.clusters``, ``detectors.neardup.pairing``'s pHash slot
and pair rule, ``rank_key``) keeps its per-hash code, because it packs each
hash into fixed-width numpy codes and batches every view of an image into one
multi-index probe -- going through a per-signal call there would cost the
hot path, and the pair rule (which view may meet which) is pHash's alone.

Light on purpose: no numpy or image libraries are imported here (only the
record, for its field names; the CLI reads ``hex_len`` for its help text, the
settings the default thresholds, which live here and nowhere else).
"""

from __future__ import annotations

import abc
import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # annotations only: reading a record needs no hashing code
    from detectors.hash_record import ImageHashes
    from detectors.neardup.hamming import HammingIndex


class SignalType(abc.ABC):
    """A kind of hash: a fixed-width bit string written as lower-case hex,
    compared by Hamming distance. Subclasses set the class attributes;
    everything is a class attribute or classmethod (no instances), as in
    python-threatexchange."""

    #: stable name ("pdq", "phash"): stored and exchanged (bank column
    #: mapping, configuration, reports), so never change it for a type
    name: ClassVar[str]
    #: how a person calls it ("PDQ", "pHash")
    label: ClassVar[str]
    bits: ClassVar[int]
    #: hex digits of one code (``bits // 4``), set from ``bits``
    hex_len: ClassVar[int]
    #: ``ImageHashes`` fields holding (the code, the mirror image's code); each
    #: name is also the ``via`` of a match made on that field
    fields: ClassVar[tuple[str, ...]] = ()
    #: the ``ImageHashes`` field holding the hasher's quality (0-100), if any:
    #: codes of a low-quality image are noise and are not matched on
    quality_field: ClassVar[str | None] = None
    #: whether it carries a quality (``quality_field``), set from it
    has_quality: ClassVar[bool] = False
    #: the ``via`` of a match through one of ``ImageHashes.views`` (crop/screenshot
    #: views) when they are codes of this type (pHash: "phash_view"), else None
    view_via: ClassVar[str | None] = None
    #: whether the record's views are codes of this type, set from ``view_via``
    has_views: ClassVar[bool] = False
    #: header names of this type's column in a shared hash list (lower case)
    csv_aliases: ClassVar[tuple[str, ...]] = ()
    #: header names of its quality column (only with ``quality_field``)
    quality_aliases: ClassVar[tuple[str, ...]] = ()
    #: match within this many bits by default: the pair rule's (``detectors.neardup.pairing``),
    #: the banks' and the settings' default
    default_threshold: ClassVar[int]
    #: codes of an image with a lower quality are not matched on by default (with ``quality_field``)
    default_min_quality: ClassVar[int | None] = None

    _pattern: ClassVar[re.Pattern[str]]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "bits" in cls.__dict__:
            if cls.bits <= 0 or cls.bits % 4:
                raise ValueError(f"signal type {cls.__name__}: bits must be a positive multiple of 4, not {cls.bits}")
            cls.hex_len = cls.bits // 4
            cls._pattern = re.compile(f"[0-9a-fA-F]{{{cls.hex_len}}}")
        cls.has_quality = cls.quality_field is not None
        cls.has_views = cls.view_via is not None

    @classmethod
    def get_name(cls) -> str:
        """``name`` (python-threatexchange's spelling)."""
        return cls.name

    @classmethod
    def is_valid(cls, text: object) -> bool:
        """Whether ``text`` is exactly ``hex_len`` hex digits (either case, nothing around them)."""
        return isinstance(text, str) and cls._pattern.fullmatch(text) is not None

    @classmethod
    def validate(cls, text: object) -> str:
        """``text`` as the normalised code (lower-case hex), or ValueError
        saying what was expected. Does not strip: a caller reading cells
        strips them first."""
        if not cls.is_valid(text):
            shown = repr(text) if not isinstance(text, str) or len(text) <= 80 else repr(text[:80]) + "..."
            raise ValueError(f"not a {cls.label} hash: expected {cls.hex_len} hex digits ({cls.bits} bits), got {shown}")
        return text.lower()  # type: ignore[union-attr]

    @classmethod
    def distance(cls, a: str, b: str) -> int:
        """Hamming distance of two valid codes (``detectors.hashing.hamming_hex``'s arithmetic)."""
        return (int(a, 16) ^ int(b, 16)).bit_count()

    @classmethod
    def matches(cls, a: str, b: str, threshold: int | None = None) -> bool:
        """``distance(a, b)`` within ``threshold`` (default ``default_threshold``); threatexchange's ``compare_hash``."""
        return cls.distance(a, b) <= (cls.default_threshold if threshold is None else threshold)

    @classmethod
    def values(cls, h: "ImageHashes") -> list[tuple[str, str | None]]:
        """(field, code) of each of ``fields`` on the record, the full code
        first, then the mirror's; a code may be None (records made before mirrors)."""
        return [(f, getattr(h, f)) for f in cls.fields]

    @classmethod
    def code(cls, h: "ImageHashes") -> str | None:
        """The record's own (full-frame, unmirrored) code: the first of ``fields``."""
        return getattr(h, cls.fields[0]) if cls.fields else None

    @classmethod
    def quality(cls, h: "ImageHashes") -> int | None:
        """The record's quality for this type, None when it carries none."""
        return getattr(h, cls.quality_field) if cls.quality_field else None

    @classmethod
    def new_index(cls) -> "HammingIndex":
        """An empty exact Hamming range index for codes of this type
        (threatexchange's ``get_index_cls``)."""
        from detectors.neardup.hamming import HammingIndex

        return HammingIndex(cls.bits)


_REGISTRY: dict[str, type[SignalType]] = {}


def register(cls: type[SignalType]) -> type[SignalType]:
    """Class decorator: make a signal type available by its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"signal type {cls.__name__} has no name")
    if name in _REGISTRY:
        raise ValueError(f"signal type {name!r} registered twice")
    if not hasattr(cls, "hex_len"):
        raise ValueError(f"signal type {name!r} has no bits")
    from detectors.hash_record import ImageHashes  # pydantic only: no hashing code

    own = (*cls.fields, *([cls.quality_field] if cls.quality_field else []))
    unknown = [f for f in own if f not in ImageHashes.model_fields]
    if unknown:  # a signal type reads the record, it does not extend it
        raise ValueError(f"signal type {name!r}: no field {', '.join(unknown)} on ImageHashes")
    claimed = {f: st.name for st in _REGISTRY.values()
               for f in (*st.fields, *([st.quality_field] if st.quality_field else []))}
    if taken := [f"{f} ({claimed[f]})" for f in own if f in claimed]:
        # two types reading one field would each validate it their way, and refuse the other's codes
        raise ValueError(f"signal type {name!r}: fields already read by another type: {', '.join(taken)}")
    if cls.has_views and any(st.has_views for st in _REGISTRY.values()):
        # ``ImageHashes.views`` hold codes of one type
        raise ValueError(f"signal type {name!r}: only one signal type can carry the record's views")
    _REGISTRY[name] = cls
    return cls


def signal_types() -> list[type[SignalType]]:
    """Every registered signal type, in registration order (PDQ, pHash first)."""
    return list(_REGISTRY.values())


def signal_type(name: str) -> type[SignalType]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown signal type {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def signal_type_of_via(via: str) -> type[SignalType] | None:
    """The signal type a match's ``via`` was made with: one of its ``fields``
    or its ``view_via``; None for a match that is not by hash ("sha256",
    "uniform")."""
    return next((st for st in _REGISTRY.values() if via in st.fields or via == st.view_via), None)


class CopyKind(enum.Enum):
    """What a match's ``via`` says the copy is."""

    SAME_FILE = "same file"  # "sha256": identical bytes
    ONE_COLOUR = "one colour"  # "uniform": two flat pictures, their grey levels compared
    NEAR = "near"  # a signal type's full code (the first of its ``fields``)
    MIRRORED = "mirrored"  # its mirror image's code (a later one of ``fields``)
    VIEW = "view"  # its ``view_via``: a crop/screenshot view met the picture
    UNKNOWN = "unknown"  # a via no registered type reads (a newer writer's, a type not registered here)


@dataclass(frozen=True)
class ViaDescription:
    """How a match was made, as its wordings need it: the kind of copy and,
    for a match by hash, the hash's ``label`` and ``bits`` (the distance's
    unit and range); both None for the other kinds."""

    via: str
    kind: CopyKind
    label: str | None = None
    bits: int | None = None


def describe_via(via: str) -> ViaDescription:
    """``via`` described from the registry, so a type is described by being
    registered. Never raises: a via nothing here reads is ``CopyKind.UNKNOWN``,
    for its caller to name as it stands rather than pass off as some hash's bits."""
    if via == "sha256":
        return ViaDescription(via, CopyKind.SAME_FILE)
    if via == "uniform":
        return ViaDescription(via, CopyKind.ONE_COLOUR)
    st = signal_type_of_via(via)
    if st is None:
        return ViaDescription(via, CopyKind.UNKNOWN)
    kind = CopyKind.VIEW if via == st.view_via else CopyKind.MIRRORED if st.fields.index(via) else CopyKind.NEAR
    return ViaDescription(via, kind, st.label, st.bits)


def view_signal_type() -> type[SignalType] | None:
    """The signal type of ``ImageHashes.views`` (pHash), if one is registered."""
    return next((st for st in _REGISTRY.values() if st.has_views), None)


@register
class PDQ(SignalType):
    """Meta's PDQ: 256 bits with a quality (0-100); ThreatExchange's image hash."""

    name = "pdq"
    label = "PDQ"
    bits = 256
    fields = ("pdq", "pdq_mirror")
    quality_field = "pdq_quality"
    csv_aliases = ("pdq", "pdq_hash", "hash", "signal_value")
    quality_aliases = ("quality", "pdq_quality")
    default_threshold = 31
    default_min_quality = 50  # flat, featureless pictures score lower: their codes are noise


@register
class PHash(SignalType):
    """The DCT pHash (``imagehash.phash``-compatible): 64 bits; also the
    code of every crop/screenshot view (``ImageHashes.views``)."""

    name = "phash"
    label = "pHash"
    bits = 64
    fields = ("phash", "phash_mirror")
    view_via = "phash_view"
    csv_aliases = ("phash", "p_hash")
    default_threshold = 10
