"""Platform connectors: long-running readers that map a platform's events to
schema-v1 events and produce them to the pipeline's events topic.

``base`` holds what they share (state, backoff, URL policy, the emitter);
``bluesky`` reads Jetstream, ``mastodon`` the streaming API; ``sinks`` is
where mapped events go (the broker, or stdout for ``--dry-run``).
"""
