"""Built-in detector plugins; importing this package registers them."""

from detectors.plugins import (  # noqa: F401  (registration side effects)
    c2pa_manifest,
    generator_metadata,
    stealth_pnginfo,
    watermark,
    xmp,
)
