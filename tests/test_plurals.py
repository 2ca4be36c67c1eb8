"""One way to count things in words (``streams.plurals.counted``), used by
the CLI, the desk's pages (its ``counted`` filter) and the broker's lines:
"1 file", "2,000 files", never "file(s)", and the same separators
everywhere."""

from __future__ import annotations

import pytest

from streams.plurals import counted


@pytest.mark.parametrize(("n", "noun", "plural", "said"), [
    (0, "file", None, "0 files"), (1, "file", None, "1 file"), (2, "file", None, "2 files"),
    (2000, "file", None, "2,000 files"), (1, "entry", "entries", "1 entry"), (1234, "entry", "entries", "1,234 entries"),
    (None, "sighting", None, "None sightings"),  # a template's missing value prints as it is, not a crash
])
def test_counted(n, noun, plural, said):
    assert counted(n, noun, plural) == said


def test_the_cli_and_the_desk_count_with_the_same_helper():
    from streams.cli import bank, pipeline, prune
    from streams.desk import pages, views

    assert bank.counted is pipeline.counted is prune.counted is views.counted is counted
    env = pages.templates().env
    assert env.filters["counted"] is counted
    assert env.from_string("{{ n | counted('entry', 'entries') }}").render(n=1200) == "1,200 entries"
    assert env.from_string("{{ rows | length | counted('cluster') }}").render(rows=[1]) == "1 cluster"
    assert 'aria-label="spread: 1,200 sightings"' in views.sparkline([1000, 200])


def test_the_templates_keep_no_plural_of_their_own():
    from pathlib import Path

    import streams.desk

    for page in (Path(streams.desk.__file__).parent / "templates").glob("*.html"):
        text = page.read_text()
        # an inline copy: {{ "" if n == 1 else "s" }}, {{ "entry" if n == 1 else "entries" }}
        assert 'else "s"' not in text and '1 else "entries"' not in text, page.name


def test_a_broker_refusing_topics_counts_them_in_words(monkeypatch):
    from kafka.errors import KafkaError

    import streams.broker as broker

    class Admin:
        def describe_topics(self):
            return []

        def create_topics(self, new):
            raise KafkaError("replication factor larger than available brokers")

        def close(self):
            pass

    class Kafka:
        replication_factor = 3

    class Settings:
        kafka = Kafka()

    monkeypatch.setattr(broker, "check_reachable", lambda *a, **k: None)
    monkeypatch.setattr(broker, "kafka_client_options", lambda settings: {})
    monkeypatch.setattr(broker, "admin_client", lambda *a, **k: Admin())
    with pytest.raises(broker.BrokerError) as e:
        broker.ensure_topics("localhost:9092", [broker.TopicSpec("t.one", 1)], settings=Settings())
    assert "create 1 topic (t.one) with 3 replicas:" in str(e.value) and "(s)" not in str(e.value)
