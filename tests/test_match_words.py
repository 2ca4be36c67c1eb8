"""How the desk says a lookup's match: read from the match's signal type, not
from the spelling of its ``via``."""

import pytest

from detectors.signals import signal_type_of_via, signal_types
from streams.desk.views import match_words


@pytest.mark.parametrize("via, words", [
    ("pdq", "a near copy: 12 of 256 PDQ bits differ"),
    ("pdq_mirror", "a mirrored copy: 12 of 256 PDQ bits differ"),
    ("phash", "a near copy: 12 of 64 pHash bits differ"),
    ("phash_mirror", "a mirrored copy: 12 of 64 pHash bits differ"),
    ("phash_view", "a crop or framed copy: 12 of 64 pHash bits differ"),
    ("sha256", "the same file (identical bytes)"),
    ("uniform", "a one-colour picture, 12 grey levels apart"),
    # a via this version does not know (a newer writer's) is not passed off as pHash bits
    ("pdqf", "a match by pdqf, distance 12"),
])
def test_match_words(via, words):
    assert match_words(via, 12) == words


def test_every_hash_via_has_its_signal_type():
    for st in signal_types():
        for via in (*st.fields, *([st.view_via] if st.view_via else [])):
            assert signal_type_of_via(via) is st
    assert signal_type_of_via("sha256") is None
