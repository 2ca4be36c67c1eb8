"""The Mastodon connector's status HTML -> text in linear time. It stripped tags with
``re.sub(r"<[^>]+>", ...)``, which scans to the end again from every ``<`` that has no ``>``
after it: a 200 KB status of stray ``<`` held the connector's event loop 12 s, and a
2 MiB frame would have held it about 20 minutes (heartbeats, the idle watchdog and
SIGTERM unserved). Real Mastodon escapes a stray ``<``; a hostile instance need not."""

from __future__ import annotations

import html
import json
import random
import re
import subprocess
import sys
from pathlib import Path

from streams.connectors.mastodon import _BREAK, MAX_CONTENT_CHARS, MastodonMapper, _strip_tags, plain_text
from streams.records import MAX_TEXT_CHARS
from tests.connector_servers import FRAMES, sse_events

REPO = Path(__file__).resolve().parents[1]
# What plain_text did before: the reference its output must keep on well-formed content.
_OLD_TAG = re.compile(r"<[^>]+>")


def _old_plain_text(content: str) -> str:
    return html.unescape(_OLD_TAG.sub("", _BREAK.sub("\n", content))).strip()


def _recorded_contents() -> list[str]:
    updates = [json.loads(b.split("data: ", 1)[1]) for b in sse_events(FRAMES / "mastodon_stream.sse")
               if "event: update\n" in b]
    backfill = json.loads((FRAMES / "mastodon_backfill.json").read_text())
    out = []
    for s in updates + backfill:
        for status in (s, s.get("reblog") or {}, ((s.get("quote") or {}).get("quoted_status") or {})):
            if status.get("content"):
                out.append(status["content"])
    return out


def test_normal_status_html_reads_as_before() -> None:
    assert plain_text("<p>a &amp; b</p><p>c<br>d</p>") == "a & b\nc\nd"
    link = ('<p>Flood on <a href="https://mastodon.example/tags/breaking" class="mention hashtag" rel="tag">'
            '#<span>breaking</span></a> via <span class="h-card"><a href="https://x.example/@ann" '
            'class="u-url mention">@<span>ann</span></a></span><br />see <a href="https://news.example/a?b=1&amp;c=2" '
            'rel="nofollow noopener" target="_blank"><span class="invisible">https://</span>'
            '<span class="">news.example/a</span></a></p><p>it&#39;s &quot;bad&quot; &lt;3 &gt; 2</p>')
    assert plain_text(link) == 'Flood on #breaking via @ann\nsee https://news.example/a\nit\'s "bad" <3 > 2'
    assert plain_text("<p>line one<BR>line two<br/>three</p>\n<p>four</p>") == "line one\nline two\nthree\nfour"
    # Stray brackets that are not tags stay text, as the regex left them.
    assert plain_text("a <> b") == "a <> b"
    assert plain_text("x < y") == "x < y"
    assert plain_text("<p>1 < 2 and 3 > 2</p>") == "1  2"  # "< 2 and 3 >" was a tag to the regex too
    recorded = _recorded_contents()
    assert len(recorded) >= 5
    for content in recorded:
        assert plain_text(content) == _old_plain_text(content), content


def test_tag_stripping_is_the_regex_on_any_short_input() -> None:
    rng = random.Random(5)
    for _ in range(50_000):
        s = "".join(rng.choice("<>ab/p \n&;") for _ in range(rng.randint(0, 24)))
        assert _strip_tags(s) == _OLD_TAG.sub("", s), repr(s)


def test_long_content_is_clipped_before_stripping_without_a_cut_tag() -> None:
    text = "word " * ((MAX_CONTENT_CHARS - 50) // 5)
    content = f'<p>{text}<a href="https://example.com/{"x" * 100}">tail</a></p>'
    assert len(content) > MAX_CONTENT_CHARS > len(text) + 3  # the cut falls inside the <a ...> tag
    out = plain_text(content)
    assert out == text.strip()  # the half tag at the cut is dropped, not shown as text
    assert MAX_CONTENT_CHARS >= 5 * MAX_TEXT_CHARS  # markup-heavy statuses still fill the event's text


# Maps one recorded image status with ``content`` swapped for 1 MB of hostile HTML and prints
# the mapping's own time: a process of its own so a regression fails on the timeout instead
# of holding the test run for minutes (the regex needed about 5 minutes for this input).
_MAP_HOSTILE = """
import json, sys, time
from streams.connectors.mastodon import MastodonMapper
from tests.connector_servers import FRAMES, sse_events

status = next(json.loads(b.split("data: ", 1)[1]) for b in sse_events(FRAMES / "mastodon_stream.sse")
              if "event: update\\n" in b and '"type":"image"' in b)
status["content"] = sys.argv[1] * (1_000_000 // len(sys.argv[1]))
frame = json.dumps(status)
t = time.perf_counter()
mapped = MastodonMapper("https://mastodon.example").map_update(frame)
took = time.perf_counter() - t
print(json.dumps({"s": took, "events": len(mapped.events), "text": mapped.events[0].text}))
"""


def test_a_megabyte_of_stray_angle_brackets_maps_in_well_under_a_second() -> None:
    for unit in ("<", "<a ", "<br <p "):
        run = subprocess.run([sys.executable, "-c", _MAP_HOSTILE, unit], capture_output=True, text=True,
                             timeout=60, cwd=REPO)
        assert run.returncode == 0, run.stderr[-2000:]
        out = json.loads(run.stdout)
        # Linear: a few milliseconds here; the regex took 12 s for a fifth of this.
        assert out["s"] < 2, (unit, out["s"])
        assert out["events"] >= 1
        assert len(out["text"]) == MAX_TEXT_CHARS and out["text"].endswith("…")


def test_mapper_text_of_a_normal_status_is_unchanged() -> None:
    content = '<p>Subway flooded <a href="https://m.example/tags/b" class="mention hashtag">#<span>b</span></a></p>'
    status = next(json.loads(b.split("data: ", 1)[1]) for b in sse_events(FRAMES / "mastodon_stream.sse")
                  if "event: update\n" in b and '"type":"image"' in b)
    status["content"] = content
    mapped = MastodonMapper("https://mastodon.example").map_update(json.dumps(status))
    assert [e.text for e in mapped.events] == ["Subway flooded #b"] * len(mapped.events) and mapped.events
