"""Pure image analysis for deepwatch: decoding, hashing, provenance, watermarks
and learned models. Nothing in this package may import Kafka or Faust: the same
code runs in stream workers, the CLI and offline evaluation."""
