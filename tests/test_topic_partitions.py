"""Existing topics' partition counts, checked by ``ensure_topics`` on the real
embedded broker (Tansu answers Metadata with every partition, as Kafka does).

The cluster stage is a single writer: ``cluster-ops`` (and its table's
changelog) must have one partition, or each partition gets an owner of its
own and two workers decide clusters. Topics created by an operator or an
older version used to be left alone whatever their count."""

from __future__ import annotations

import logging

import pytest

from streams.broker import BrokerError, EmbeddedBroker, TopicSpec, admin_client, ensure_topics


def _create(bootstrap: str, topics: dict[str, int]) -> None:
    admin = admin_client(bootstrap, None, client_id="test-admin", timeout_s=10)
    try:
        admin.create_topics({name: {"num_partitions": n, "replication_factor": 1} for name, n in topics.items()})
    finally:
        admin.close()


def _counts(bootstrap: str) -> dict[str, int]:
    admin = admin_client(bootstrap, None, client_id="test-admin", timeout_s=10)
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
    finally:
        admin.close()


def test_single_writer_topic_with_two_partitions_is_refused_in_one_line(tmp_path):
    with EmbeddedBroker(tmp_path) as b:
        _create(b.bootstrap, {"sw.cluster-ops": 2})
        specs = [TopicSpec("sw.events", 4), TopicSpec("sw.cluster-ops", 1, single_writer=True)]
        with pytest.raises(BrokerError) as refused:
            ensure_topics(b.bootstrap, specs)
        message = str(refused.value)
        assert "\n" not in message
        assert "topic sw.cluster-ops has 2 partitions but must have exactly 1" in message
        assert "--delete --topic sw.cluster-ops" in message  # the fix
        assert "sw.events" not in _counts(b.bootstrap)  # refused before anything was created


def test_single_writer_topic_with_one_partition_and_new_topics_pass(tmp_path, caplog):
    with EmbeddedBroker(tmp_path) as b:
        _create(b.bootstrap, {"ok.cluster-ops": 1, "ok.events": 4})
        specs = [TopicSpec("ok.events", 4), TopicSpec("ok.cluster-ops", 1, single_writer=True),
                 TopicSpec("ok.alerts", 4)]
        with caplog.at_level(logging.WARNING, logger="streams.broker"):
            ensure_topics(b.bootstrap, specs)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        counts = _counts(b.bootstrap)
        assert (counts["ok.cluster-ops"], counts["ok.events"], counts["ok.alerts"]) == (1, 4, 4)


def test_other_count_mismatch_is_a_warning_and_the_topic_is_kept(tmp_path, caplog):
    with EmbeddedBroker(tmp_path) as b:
        _create(b.bootstrap, {"mm.events": 2})
        with caplog.at_level(logging.WARNING, logger="streams.broker"):
            ensure_topics(b.bootstrap, [TopicSpec("mm.events", 4)])
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [(r.topic, r.partitions, r.configured) for r in warned] == [("mm.events", 2, 4)]
        assert _counts(b.bootstrap)["mm.events"] == 2


def test_a_topic_the_broker_gives_no_partitions_for_is_not_refused(tmp_path):
    # Metadata answers a topic whose leader is not elected yet (or an error)
    # with an error code and no partitions: no count, so no refusal.
    from streams.broker import _partition_counts, check_partition_counts

    with EmbeddedBroker(tmp_path) as b:
        _create(b.bootstrap, {"un.cluster-ops": 2})
        admin = admin_client(b.bootstrap, None, client_id="test-admin", timeout_s=10)
        try:
            described = admin.describe_topics(["un.cluster-ops", "un.missing"])
        finally:
            admin.close()
    assert [t["error_code"] for t in described] == [0, 3]  # UNKNOWN_TOPIC_OR_PARTITION for the missing one
    counts = _partition_counts(described)
    assert counts == {"un.cluster-ops": 2, "un.missing": None}
    check_partition_counts(b.bootstrap, [TopicSpec("un.missing", 1, single_writer=True)], counts)
    with pytest.raises(BrokerError, match="un.cluster-ops has 2 partitions"):
        check_partition_counts(b.bootstrap, [TopicSpec("un.cluster-ops", 1, single_writer=True)], counts)


def test_the_pipelines_own_cluster_ops_topic_with_two_partitions_is_refused(tmp_path):
    # What the pipeline asks for (streams.topics): an operator's 2-partition
    # cluster-ops would give each partition an owner, two writers of clusters.
    from streams.settings import Settings
    from streams.topics import topic_specs

    settings = Settings(data_dir=tmp_path / "data")
    specs = topic_specs(settings)
    assert {s.name for s in specs if s.single_writer} == {
        settings.topic("cluster-ops"), f"{settings.app_id}-clusters-changelog"}
    with EmbeddedBroker(tmp_path) as b:
        _create(b.bootstrap, {settings.topic("cluster-ops"): 2})
        with pytest.raises(BrokerError, match=f"topic {settings.topic('cluster-ops')} has 2 partitions"):
            ensure_topics(b.bootstrap, specs)


def test_kafka_python_2_metadata_names_topics_too():
    # kafka-python 2.x's describe_topics answers Metadata v1 as parsed dicts
    # whose topic field is "topic" (3.x: "name"); pyproject allows both.
    from streams.broker import _partition_counts

    v2 = [{"error_code": 0, "topic": "a.cluster-ops", "is_internal": False,
           "partitions": [{"error_code": 0, "partition": 0}, {"error_code": 0, "partition": 1}]},
          {"error_code": 3, "topic": "a.gone", "is_internal": False, "partitions": []}]
    assert _partition_counts(v2) == {"a.cluster-ops": 2, "a.gone": None}


@pytest.mark.slow
def test_a_workers_topic_warning_is_a_line_of_its_json_log(tmp_path):
    """The check runs before the worker's own start, so it once logged through
    Python's last resort: a bare text line without the topic or the counts."""
    import json
    import os
    import queue
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    deepwatch = Path(sys.executable).with_name("deepwatch")
    with EmbeddedBroker(tmp_path / "broker") as b:
        _create(b.bootstrap, {"deepwatch.events": 2})
        env = {**os.environ, "DEEPWATCH_LOG_FORMAT": "json", "DEEPWATCH_METRICS_PORT": "0"}
        proc = subprocess.Popen([str(deepwatch), "worker", "--role", "analyze", "--broker", f"kafka://{b.bootstrap}",
                                 "--data-dir", str(tmp_path / "data")],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in iter(proc.stderr.readline, "")], daemon=True).start()
        try:
            deadline = time.monotonic() + 60
            while True:  # a worker that stays up saying nothing must not hold the test past the deadline
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                if "left as it is" in line:
                    break
            doc = json.loads(line)
            assert (doc["level"], doc["topic"], doc["partitions"], doc["configured"]) == \
                ("warning", "deepwatch.events", 2, 4)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
