"""XMP provenance: IPTC DigitalSourceType and the generator named as CreatorTool.

Unsigned, so weaker than C2PA, but generators (Firefly, DALL·E, Midjourney,
Imagen) write ``Iptc4xmpExt:DigitalSourceType`` themselves and re-posting
often keeps XMP when it drops everything else. An unsigned *capture* claim is
trivial to forge and is therefore reported without weight.
"""

from __future__ import annotations

from detectors.base import Detector, Evidence, EvidenceKind, register
from detectors.imagedata import ImageData
from detectors.plugins._generators import find_generator
from detectors.plugins._source_types import classify, reported_codes, source_type_code
from detectors.plugins._xmp import (
    IPTC_EXT_NS,
    ST_EVT_NS,
    XMP_NS,
    find_xmp_packets,
    parse_packets,
    property_values,
)

# A creator tool as reported (a tool name; the packet's value may be 4,096 characters).
MAX_TOOL_CHARS = 200


@register
class XmpDetector(Detector):
    name = "xmp"
    kind = EvidenceKind.PROVENANCE
    cost = "cheap"

    def analyze(self, image: ImageData) -> list[Evidence]:
        roots = parse_packets(find_xmp_packets(image.data))
        if not roots:
            return []
        codes = [c for c in (source_type_code(v) for v in property_values(roots, IPTC_EXT_NS, "DigitalSourceType")) if c]
        tools = property_values(roots, XMP_NS, "CreatorTool") + property_values(roots, ST_EVT_NS, "softwareAgent")
        generators = sorted({g for g in (find_generator(t, free_text=False) for t in tools) if g})
        shown = reported_codes(codes)  # a bounded few: the evidence travels in a 1 MB message
        data = {"digital_source_types": sorted(shown), "creator_tools": [t[:MAX_TOOL_CHARS] for t in sorted(set(tools))[:20]],
                "generators": generators}

        ai_codes = sorted(c for c in shown if classify(c) == "ai")
        if ai_codes:
            detail = f"XMP Iptc4xmpExt:DigitalSourceType is {', '.join(ai_codes)} (generative AI)"
            if generators:
                detail += f"; creator tool {', '.join(generators)}"
            return [Evidence(detector=self.name, kind=self.kind, score=0.97, weight=2.0, detail=detail, data=data)]
        if generators:
            detail = f"XMP creator tool names an AI generator: {', '.join(generators)}"
            return [Evidence(detector=self.name, kind=self.kind, score=0.95, weight=2.0, detail=detail, data=data)]
        if codes:
            detail = f"XMP Iptc4xmpExt:DigitalSourceType is {', '.join(sorted(shown))} (unsigned, not AI)"
            return [Evidence(detector=self.name, kind=self.kind, score=0.5, weight=0.0, detail=detail, data=data)]
        return []
