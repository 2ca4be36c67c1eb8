"""Names of the packaged models, in a module of their own: settings and the
CLI name the default without importing the model code (``detectors.models``
pulls in numpy, torch and the backbone)."""

from __future__ import annotations

# the packaged pixel detector (``detectors.models.pixel_detector``): ``detect.models``' default,
# its head card's name and ``deepwatch train --recipe pixel-probe``'s
DEFAULT_PIXEL_MODEL = "pixel-probe-lite2"
