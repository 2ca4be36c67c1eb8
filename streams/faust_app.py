"""The Faust app of a worker role: the settings every role shares.

Its own module so that the detect role (``streams.detect_worker``) builds its
app without importing the pipeline's stages.
"""

from __future__ import annotations

from pathlib import Path

import faust

from streams.broker import faust_credentials
from streams.faust_tuning import TABLE_MANAGER
from streams.private_files import own_dir, private_dir
from streams.settings import Settings
from streams.stall_guard import install as install_stall_guard
from streams.tansu_compat import HEARTBEAT_INTERVAL_S, SESSION_TIMEOUT_S


def faust_app(app_id: str, settings: Settings, broker_url: str) -> faust.App:
    """The Faust app every worker role runs, tuned for the broker behind
    ``broker_url`` (``tansu://``: the embedded broker's quirks,
    ``streams.tansu_compat``)."""
    tansu = broker_url.startswith("tansu://")
    # Faust makes its own files and directories under ``datadir`` (``v1/tables``;
    # the table state with a RocksDB store) at the umask's modes and is not
    # ours to change: ``faust/`` 0700 before the app starts, narrowed if made
    # wider before, is enough, for nothing under it can be reached then.
    datadir = own_dir(Path(settings.data_dir) / "faust", "Faust state directory") / app_id
    private_dir(datadir)
    app = faust.App(
        app_id,
        broker=broker_url,
        store="memory://",  # state is rebuilt from the changelog; nothing to corrupt on disk
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        topic_allow_declare=False,  # every topic is created up front (streams.broker.ensure_topics)
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        # Tansu holds JoinGroup answers for about half the session (streams.tansu_compat (b)).
        broker_session_timeout=SESSION_TIMEOUT_S if tansu else 60.0,
        broker_heartbeat_interval=HEARTBEAT_INTERVAL_S if tansu else 3.0,
        broker_commit_interval=1.0,
        table_standby_replicas=1,
        web_enabled=False,
        producer_acks=-1,
        stream_wait_empty=False,
        broker_credentials=faust_credentials(settings),  # SASL/SSL for managed Kafka (settings.kafka)
        TableManager=TABLE_MANAGER,  # no fixed 1 s sleep before joining the group (streams.faust_tuning)
    )
    # Partitions that stop being read while records wait are read again: a
    # worker idling there would never recover by itself (streams.stall_guard).
    install_stall_guard(app)
    return app
