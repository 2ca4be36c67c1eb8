"""deepwatch stream processing: Faust app, ingest, pipeline stages, sinks,
alerts and the command line."""
