"""Ctrl-C and SIGTERM never land inside a producer send (streams.held_signals)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from streams.held_signals import HeldSignals
from tests.connector_servers import read_topic


class Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise Stop(signum)


def test_a_held_signal_is_raised_by_the_handler_before_it_when_delivered():
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with HeldSignals() as held:
            os.kill(os.getpid(), signal.SIGTERM)
            reached = True  # not raised where it landed
            assert held.noted == [signal.SIGTERM]
            with pytest.raises(Stop):
                held.deliver()
            # delivered: the handlers are back, so a second signal acts at once
            assert signal.getsignal(signal.SIGTERM) is _raise_stop
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert reached
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_held_to_the_end_is_raised_on_leaving_and_none_is_raised_twice():
    with pytest.raises(KeyboardInterrupt):
        with HeldSignals():
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with HeldSignals() as held:  # nothing noted: leaving raises nothing
        held.deliver()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_inside_a_send_lets_the_send_finish_and_the_topic_stays_readable(tmp_path, monkeypatch):
    # A Ctrl-C landing inside kafka-python's send could fall between the batch
    # builder counting a record and writing it: the batch sent on close then
    # said 4 records and held 3, and every read of the partition failed with
    # CorruptRecordError (CI). Here the Ctrl-C arrives while send runs.
    from kafka import KafkaProducer

    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.ingest import Produced, produce_lines
    from streams.settings import Settings
    from streams.topics import topic_specs

    real_send = KafkaProducer.send
    calls = []

    def send(self, topic, *args, **kwargs):
        calls.append(topic)
        if len(calls) == 50:
            os.kill(os.getpid(), signal.SIGINT)  # Python raises at the next bytecode, unless held
        return real_send(self, topic, *args, **kwargs)

    monkeypatch.setattr(KafkaProducer, "send", send)
    settings = Settings(topic_prefix="held")
    lines = ((i, json.dumps({"schema_version": 1, "event_id": f"e{i}", "platform": "x", "account_id": "a",
                             "posted_at": "2026-11-30T10:00:00Z", "image": {"url": f"https://x.org/{i}.jpg"}}).encode())
             for i in range(1000))
    out = Produced()
    with EmbeddedBroker(tmp_path / "broker") as broker:
        ensure_topics(broker.bootstrap, topic_specs(settings), settings=settings)
        with pytest.raises(KeyboardInterrupt):
            produce_lines(lines, broker.bootstrap, settings, out=out)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert len(calls) == 50 and out.lines == 50  # stopped at the next event, not the end of the feed
        assert out.sent == 50  # the interrupted send went out and was confirmed with the others
        values = read_topic(broker.bootstrap, settings.topic("events"), 50, timeout_s=30)
        assert sorted(json.loads(v)["event_id"] for v in values) == sorted(f"e{i}" for i in range(50))
