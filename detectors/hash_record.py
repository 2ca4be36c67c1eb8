"""The hash record of one image (``ImageHashes``): what the hashers compute
(``detectors.hashing``) and every message, state and store carries.

Its own module, free of numpy and image libraries, so that reading and
writing records (the CLI, the findings store, the records of the stream)
does not load the hashing code.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ImageHashes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phash: str  # 64-bit, 16 hex chars
    pdq: str  # 256-bit, 64 hex chars
    pdq_quality: int
    # the mirror image's pHash; of the trimmed view when ``trimmed``
    phash_mirror: str | None = None
    pdq_mirror: str | None = None
    # pHashes of extra views (16 hex each), for crops and screenshots: when
    # ``trimmed``, views[0] is the content inside a detected border/padding;
    # then the 90% and 80% centre crops of the content (the trimmed box, or the
    # whole image), then the off-centre ``VIEW_BOXES``; when ``trimmed``
    # (v6 on) then the whole frame's ``FRAME_CROPS`` centre crops
    # (``frame_extras``); last (v7 on) the content's ``SIDE_BANDS``
    # (``side_views``). None on records made before views existed:
    # matching falls back to the full-frame hashes.
    views: list[str] | None = None
    trimmed: bool = False
    # where the trimmed content sits in the whole frame, (x0, y0, x1, y1) as
    # fractions of the frame: set with the frame crops (v6 on); pairs of
    # frame-relative codes are verified on pixels mapped through it
    content_box: tuple[float, float, float, float] | None = None
    # 32x32 grey thumbnail of the content (trimmed box or whole image), base64
    # uint8: hash matches are verified on it (``detectors.neardup``); None on
    # records made before it existed (matching then trusts the hashes alone)
    thumb: str | None = None
