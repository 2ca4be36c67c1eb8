"""A viral picture's cluster state: the windows found by bisection agree with
scanning every sighting, and no state is written past what Kafka accepts."""

from __future__ import annotations

import json
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

from streams import virality
from streams.clustering import MAX_STATE_BYTES, ClusterEngine, ClusterState, fit
from streams.demo_feed import scene
from streams.records import MAX_SAMPLE_POSTS, ClusterOp
from streams.settings import Settings
from streams.virality import WINDOW_1H, WINDOW_5M, RecentSighting
from tests.test_cluster_engine import sighting


def scanned_velocity(recent, now):
    """The windows as they were computed before bisection: every sighting scanned."""
    in_5m = [r for r in recent if r.t > now - WINDOW_5M]
    in_1h = [r for r in recent if r.t > now - WINDOW_1H]
    return (len(in_5m), len(in_1h), len({r.a for r in in_1h}), sum(r.g for r in in_1h))


sightings = st.lists(st.tuples(st.integers(0, 8000), st.integers(0, 30), st.integers(0, 5)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(sightings, st.integers(0, 8000), st.sampled_from([5000, 7]))
def test_adding_sightings_one_by_one_matches_sorting_them_all(rows, late, cap):
    recent: list[RecentSighting] = []
    scanned: list[RecentSighting] = []
    now = 0.0
    with patch.object(virality, "MAX_RECENT", cap):  # 7: the cap on the window's length bites too
        for i, (t, a, g) in enumerate([*rows, (late, 0, 1)]):  # the last one may come out of order
            r = RecentSighting(t=float(t), e=f"e{i}", a=f"a{a}", p="x", g=g)
            now = max(now, r.t)
            recent = virality.add(recent, r, now)
            scanned = virality.trim([*scanned, r], now)
            assert recent == scanned
            v = virality.velocity(recent, now)
            assert (v.sightings_5m, v.sightings_1h, v.accounts_1h, v.engagement_1h) == scanned_velocity(scanned, now)
            for other in scanned:
                assert virality.seen(recent, other.e)
            assert not virality.seen(recent, "never")


def viral_state(reposts: int, id_chars: int) -> ClusterState:
    """A cluster's state after ``reposts`` reposts of one picture, each by its
    own account, with event and account ids ``id_chars`` long."""
    eng = ClusterEngine(Settings())
    state = None
    img = scene(3)
    base = sighting(img, "e0", 0.0)
    for i in range(reposts):
        ev = base.event.model_copy(update={"event_id": f"{i:0{id_chars}d}", "account_id": f"{i:0{id_chars}d}",
                                           "posted_at": base.event.posted_at.replace(microsecond=0)})
        op = ClusterOp(kind="sighting", sighting=base.model_copy(update={"event": ev}))
        out = eng.apply(op, i, lambda cid: state if state is not None and state.cluster_id == cid else None)
        state = next(iter(out.writes.values()))
    return state


def test_a_viral_state_is_written_within_the_budget_keeping_its_newest_sightings_and_first_accounts():
    # 6,000 reposts by accounts with 120-character ids: 5,000 sightings in its
    # last hour and 6,000 accounts, ~1.7 MB as it is (Kafka refuses > 1 MB by default)
    state = viral_state(6000, 120)
    assert len(state.dumps()) > 1_048_588
    newest = state.recent[-1]
    accounts = len(state.accounts)
    raw = fit(state)
    assert len(raw) <= MAX_STATE_BYTES
    assert raw == state.dumps()  # what is written is the state the stage goes on with
    back = ClusterState.loads(raw)
    assert back.recent[-1] == newest and back.recent == sorted(back.recent, key=lambda r: r.t)
    assert len(back.recent) > 500  # its windows still count (shed in proportion with the accounts)
    assert 0 < len(back.accounts) < accounts and back.accounts[0] == f"{0:0120d}"  # the first spreaders stay
    assert back.members  # the picture itself stays
    # the earliest posts (what alerts carry) are a few and never shed: all posted at
    # one time, the smallest event ids
    assert [p.event_id for p in back.sample_posts] == [f"{i:0120d}" for i in range(MAX_SAMPLE_POSTS)]
    again = viral_state(6000, 120)
    assert fit(again) == raw  # a replay sheds alike


def test_a_state_within_the_budget_is_written_as_it_is():
    state = viral_state(50, 40)
    assert fit(state) == state.dumps() and len(json.loads(state.dumps())["recent"]) == 50
