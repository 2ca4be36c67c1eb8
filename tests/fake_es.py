"""A loopback stand-in for the Elasticsearch REST endpoints deepwatch uses.

THIS IS A FAKE, kept honest in these ways:
- it answers only the endpoints deepwatch calls (root info, ILM policy,
  component/index templates, stored scripts, alias HEAD, index and data
  stream creation, _bulk, _search, _refresh, GET _doc) with the response
  shapes of the Elasticsearch REST API docs, the ``X-Elastic-Product``
  header the official client insists on, and the real error bodies
  (media_type_header_exception for a client speaking a newer major,
  index_not_found_exception, resource_already_exists_exception,
  version_conflict_engine_exception, es_rejected_execution_exception,
  strict_dynamic_mapping_exception / mapper_parsing_exception);
- documents are checked against the mappings deepwatch itself PUT (strict
  objects, numbers, dates, bit vectors), so a bad document fails here as it
  would on a server;
- each index keeps the mapping and the analysis settings it was made with
  (a template changed later applies to new indices only); mappings that name
  an analyzer or normalizer the settings they are parsed with do not define
  are refused (a component template is validated on its own, as the server
  does), and so is a ``PUT _mapping`` that changes a field's type, analyzer
  or normalizer, or a ``PUT _settings`` of analysis on an open index;
- text fields are tokenized by the analyzer their mapping names (the
  ``standard`` one, or a ``custom`` one of ``mapping`` character filters, the
  ``standard`` tokenizer and ``lowercase``: see "text analysis" below), each
  index by its own, the query by the field's search analyzer;
- search implements the query DSL subset deepwatch sends (bool, term,
  terms, ids, range, exists, nested, multi_match phrase, match_all,
  wildcard - case_insensitive too -), sort,
  search_after, collapse, _source filtering, hybrid kNN on bit vectors
  (score = (bits - hamming) / bits, as ES documents for element_type bit)
  and the aggregations deepwatch asks for (filters, filter, terms, date_range,
  cardinality - exact here, sum, max - of a field, a date's in epoch
  milliseconds, or of the script ``_score`` -, composite with one terms
  source, top_hits); dates are kept to the millisecond, as a ``date`` field
  keeps them;
- and the search API's limits: ``from + size`` over index.max_result_window
  (10,000) and a terms query over index.max_terms_count (65,536) are refused
  with 400, as a server refuses them, and ``hits.total`` counts documents
  (not collapsed groups) exactly only up to ``track_total_hits`` (default
  10,000, then ``"relation": "gte"``);
- partial answers as a server gives them by default: a search some shards
  failed is 200 without their hits and buckets, counted in
  ``_shards.failed`` with ``_shards.failures`` (``fail_shards``; each
  concrete index is one shard here), and a search cut by its ``timeout`` or
  the cluster's ``search.default_search_timeout`` is 200 ``timed_out: true``
  (``time_out_searches``, ``default_search_timeout``); and a request applied
  and answered only after the client stopped waiting (``stall_answers``).
What it does NOT do: run painless (the one stored script deepwatch uses,
the cluster upsert, is emulated in Python by its id and source, the inline
ones - the delivery guard - by their exact source; a different id or source
is refused, and so are params the script would fail on), analyse
text with the full Unicode word-boundary rules (see "text analysis"; relevance
is a plain tf-idf, not BM25), shards, replication or ILM transitions; a data
stream rolls over only when told (``POST <stream>/_rollover``, at once, or
``?lazy=true``, on its next write). Unknown endpoints
answer 400 and are recorded in ``unhandled`` so tests can assert none.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import re
import threading
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from streams import es_templates as T

# -- text analysis ----------------------------------------------------------------
# A text field is tokenized by the analyzer its mapping names (``analyzer``; at
# query time ``search_quote_analyzer``, ``search_analyzer``, then ``analyzer``:
# specify-an-analyzer), from the index's own ``index.analysis`` settings, which
# it took from the templates when it was made. What is modelled, from the
# analysis reference: the ``standard`` analyzer (standard tokenizer +
# lowercase), and ``custom`` analyzers of ``mapping`` character filters
# (analysis-mapping-charfilter: ``key => value`` rules, ``\uXXXX`` escapes,
# both sides trimmed, the longest key matching at a point wins), the
# ``standard`` tokenizer and the ``lowercase`` filter. Anything else is a gap
# of the fake and fails loudly.
#
# The standard tokenizer follows Unicode word boundaries (UAX #29) as far as
# deepwatch's texts need: letters and digits (with their combining marks and
# the format characters rule WB4 ignores) form words; Single_Quote and
# MidNumLet characters join two letters or two digits (WB6/7, WB11/12),
# MidLetter two letters, MidNum two digits, ExtendNumLet anything (WB13a/b);
# each CJK ideograph and each hiragana is a token of its own (Lucene's
# <IDEOGRAPHIC> and <HIRAGANA>), katakana run together (WB13). Not modelled:
# emoji tokens, Hebrew's double quote, Southeast Asian scripts, the 255-character
# token limit.
_IDEOGRAPH = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_HIRAGANA = "\u3041-\u3096\u309d-\u309f"
_KATAKANA = "\u3031-\u3035\u309b\u309c\u30a0-\u30fa\u30fc-\u30ff\u31f0-\u31ff\u32d0-\u32fe\u3300-\u3357\uff66-\uff9d"
_SINGLE = re.compile(f"[{_IDEOGRAPH}{_HIRAGANA}]")
_KATA = re.compile(f"[{_KATAKANA}]")
_MID_LETTER = set("\u003a\u00b7\u0387\u055f\u05f4\u2027\ufe13\ufe55\uff1a")
_MID_NUM = set("\u002c\u003b\u037e\u0589\u060c\u060d\u066c\u07f8\u2044\ufe10\ufe14\ufe50\ufe54\uff0c\uff1b")
_MID_NUM_LET = set("\u0027\u002e\u2018\u2019\u2024\ufe52\uff07\uff0e")  # with Single_Quote (WB6/7, WB11/12 treat them alike)
_EXTEND_NUM_LET = set("\u005f\u202f\u203f\u2040\u2054\ufe33\ufe34\ufe4d\ufe4e\ufe4f\uff3f")
BUILTIN_ANALYZERS = {"default", "standard", "simple", "whitespace", "stop", "keyword", "pattern", "fingerprint",
                     "arabic", "armenian", "basque", "bengali", "brazilian", "bulgarian", "catalan", "cjk", "czech",
                     "danish", "dutch", "english", "estonian", "finnish", "french", "galician", "german", "greek",
                     "hindi", "hungarian", "indonesian", "irish", "italian", "latvian", "lithuanian", "norwegian",
                     "persian", "portuguese", "romanian", "russian", "serbian", "sorani", "spanish", "swedish",
                     "turkish", "thai"}
BUILTIN_NORMALIZERS = {"lowercase"}


def _word_break(c: str) -> str:
    """The UAX #29 Word_Break class of ``c``, as far as the fake models it."""
    if _SINGLE.match(c):
        return "single"
    if _KATA.match(c):
        return "katakana"
    if c in _MID_NUM_LET:
        return "midnumlet"
    if c in _MID_LETTER:
        return "midletter"
    if c in _MID_NUM:
        return "midnum"
    if c in _EXTEND_NUM_LET:
        return "extendnumlet"
    cat = unicodedata.category(c)
    if cat == "Nd":
        return "numeric"
    if cat[0] == "L" or cat == "Nl":
        return "letter"
    if cat[0] == "M" or (cat == "Cf" and c != "\u200b"):  # WB4: Extend, Format, ZWJ ride along
        return "extend"
    return "other"


def _joins(a: str, b: str) -> bool:
    """No word boundary between classes ``a`` and ``b`` (WB5, WB8-10, WB13, WB13a/b)."""
    return ((a in ("letter", "numeric") and b in ("letter", "numeric")) or a == b == "katakana"
            or (b == "extendnumlet" and a in ("letter", "numeric", "katakana", "extendnumlet"))
            or (a == "extendnumlet" and b in ("letter", "numeric", "katakana")))


def _joins_across(a: str, mid: str, b: str) -> bool:
    """No word boundary either side of ``mid`` between ``a`` and ``b`` (WB6/7, WB11/12)."""
    return ((a == b == "letter" and mid in ("midletter", "midnumlet"))
            or (a == b == "numeric" and mid in ("midnum", "midnumlet")))


def standard_tokens(text: str) -> list[str]:
    """The ``standard`` tokenizer's tokens (their text as it is: the
    ``standard`` analyzer lowercases them after)."""
    kinds = [_word_break(c) for c in text]
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if kinds[i] == "single":
            j = i + 1
            while j < n and kinds[j] == "extend":
                j += 1
            out.append(text[i:j])
            i = j
            continue
        if kinds[i] not in ("letter", "numeric", "katakana", "extendnumlet"):
            i += 1
            continue
        last, j = i, i + 1  # last: the word's last character that is not an extend one
        while j < n:
            if kinds[j] == "extend":  # WB4: attached to what precedes
                j += 1
                continue
            if _joins(kinds[last], kinds[j]):
                last, j = j, j + 1
                continue
            after = j + 1
            while after < n and kinds[after] == "extend":
                after += 1
            if after < n and _joins_across(kinds[last], kinds[j], kinds[after]):
                last, j = after, after + 1
                continue
            break
        word = text[i:j]
        if any(kinds[x] in ("letter", "numeric", "katakana") for x in range(i, j)):  # not an underscore alone
            out.append(word)
        i = j
    return out


def _unescape_rule(s: str) -> str:
    """A mapping rule's side as the filter reads it: trimmed, then the
    escapes ``\\\\``, ``\\n``, ``\\t``, ``\\r``, ``\\b``, ``\\f`` and ``\\uXXXX``."""
    s, out, i = s.strip(), [], 0
    while i < len(s):
        c = s[i]
        i += 1
        if c == "\\" and i < len(s):
            c = s[i]
            i += 1
            if c == "u":
                c, i = chr(int(s[i:i + 4], 16)), i + 4
            else:
                c = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}.get(c, c)
        out.append(c)
    return "".join(out)


def _mapping_char_filter(rules: tuple[str, ...]) -> Callable[[str], str]:
    pairs = {}
    for rule in rules:
        m = re.match(r"(.*)\s*=>\s*(.*)\s*$", rule)
        if m is None:
            raise _Err(400, error_body("illegal_argument_exception", f"Invalid Mapping Rule : [{rule}]", 400))
        key = _unescape_rule(m.group(1))
        if key in pairs:  # Lucene's NormalizeCharMap.Builder refuses a key twice
            raise _Err(400, error_body("illegal_argument_exception", f'match "{key}" was already added', 400))
        pairs[key] = _unescape_rule(m.group(2))
    keys = sorted(pairs, key=len, reverse=True)

    def run(text: str) -> str:
        out, i = [], 0
        while i < len(text):
            for k in keys:
                if k and text.startswith(k, i):
                    out.append(pairs[k])
                    i += len(k)
                    break
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    return run


def resolve_analyzer(name: str | None, analysis: dict[str, Any]) -> str:
    """An analyzer (by name, as the index's settings define it) as one
    hashable description the fake runs: the JSON of its parts."""
    name = name or "default"
    custom = (analysis.get("analyzer") or {})
    if name == "default" and "default" not in custom:
        name = "standard"
    if name == "standard" and "standard" not in custom:
        return json.dumps({"char_filter": [], "tokenizer": "standard", "filter": ["lowercase"]})
    spec = custom.get(name)
    assert spec is not None, f"fake ES: built-in analyzer {name!r} not modelled"
    assert spec.get("type", "custom") == "custom", f"fake ES: analyzer type {spec.get('type')!r} not modelled"
    filters = []
    for cf in spec.get("char_filter") or []:
        d = (analysis.get("char_filter") or {}).get(cf)
        assert d is not None and d.get("type") == "mapping", f"fake ES: char_filter {cf!r} not modelled"
        filters.append(d["mappings"])
    assert spec.get("tokenizer") == "standard", f"fake ES: tokenizer {spec.get('tokenizer')!r} not modelled"
    for f in spec.get("filter") or []:
        assert f == "lowercase", f"fake ES: token filter {f!r} not modelled"
    return json.dumps({"char_filter": filters, "tokenizer": "standard", "filter": spec.get("filter") or []})


@functools.lru_cache(maxsize=65536)
def analyze(text: str, analyzer: str) -> tuple[str, ...]:
    """``text``'s tokens by ``analyzer`` (``resolve_analyzer``'s)."""
    a = json.loads(analyzer)
    for rules in a["char_filter"]:
        text = _mapping_char_filter(tuple(rules))(text)
    toks = standard_tokens(text)
    if "lowercase" in a["filter"]:
        toks = [t.lower() for t in toks]
    return tuple(toks)


@dataclass
class Recorded:
    method: str
    path: str
    params: dict[str, list[str]]
    headers: dict[str, str]
    body: Any  # parsed JSON, list of NDJSON lines for _bulk, or None
    size: int = 0  # bytes of the body as received


@dataclass
class ItemFault:
    """Make matching bulk items fail ``times`` times with ``status``/``error``."""

    match: Callable[[str, dict, dict | None], bool]  # (op, header meta, source) -> bool
    status: int
    error: dict[str, Any]
    times: int = 1


def rejected_execution() -> dict[str, Any]:
    return {"type": "es_rejected_execution_exception",
            "reason": "rejected execution of coordinating operation [coordinating_and_primary_bytes=0, "
                      "replica_bytes=0, all_bytes=0, coordinating_operation_bytes=1048576, "
                      "max_coordinating_and_primary_bytes=107374182]"}


def error_body(kind: str, reason: str, status: int, **extra: Any) -> dict[str, Any]:
    cause = {"type": kind, "reason": reason, **extra}
    return {"error": {"root_cause": [cause], **cause}, "status": status}


class FakeElasticsearch:
    def __init__(self, version: str = "9.1.5"):
        self.version = version
        self.major = int(version.split(".")[0])
        self.lock = threading.RLock()
        self.requests: list[Recorded] = []
        self.unhandled: list[Recorded] = []
        self.crashes: list[str] = []
        self.docs: dict[str, dict[str, dict[str, Any]]] = {}  # concrete index -> id -> source
        self.meta: dict[str, dict[str, dict[str, int]]] = {}  # concrete index -> id -> seq/version
        self.aliases: dict[str, str] = {}
        self.data_streams: dict[str, str] = {}  # name -> its write (newest) backing index
        self.stream_backing: dict[str, list[str]] = {}  # name -> every backing index, oldest first
        self.component_templates: dict[str, dict] = {}
        self.index_templates: dict[str, dict] = {}
        self.scripts: dict[str, dict] = {}
        self.ilm: dict[str, dict] = {}
        # fields put in place (PUT <index>/_mapping), as sent; each index keeps its own
        # mapping (``index_mappings``: the templates' when it was made, then what was put)
        self.put_mappings: list[tuple[str, dict]] = []
        self.index_mappings: dict[str, dict[str, Any]] = {}  # concrete index -> {_meta, dynamic, properties}
        # each index's own settings as flat ``index.*`` keys: the templates' when it was made
        # (analysis settings are static: no later template or request changes them on an open index)
        self.index_settings: dict[str, dict[str, Any]] = {}
        self.index_analysis: dict[str, dict[str, Any]] = {}  # concrete index -> its ``index.analysis``, nested
        self.rollover_on_write: set[str] = set()  # data streams a lazy rollover marked
        self._df_memo: dict[tuple, int] = {}
        self.request_faults: list[tuple[Callable[[str, str], bool], int, dict, int]] = []
        self.item_faults: list[ItemFault] = []
        self.search_timeouts: list[list[Any]] = []  # [index expression suffix, times left] (time_out_searches)
        # the dynamic cluster setting ``search.default_search_timeout`` (default -1: none), which
        # bounds every search that does not carry a ``timeout`` of its own
        self.default_search_timeout: str | None = None
        self.search_stalls: list[list[Any]] = []  # [seconds, times left] (stall_searches)
        self.answer_stalls: list[list[Any]] = []  # [path suffix, seconds, times left] (stall_answers)
        self.shard_faults: list[list[Any]] = []  # [concrete index, reason type, times left] (fail_shards)
        # a proxy's body limit in front of the server (an ingress's 1 MiB): a larger request is
        # answered 413 with the proxy's own page, not an Elasticsearch error body
        self.max_body_bytes: int | None = None
        self._seq = 0
        self._scores: dict[int, float] = {}
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> "FakeElasticsearch":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # small keep-alive responses: no 40 ms delayed-ACK stalls

            def log_message(self, *a: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, body = fake.handle(self.command, self.path, dict(self.headers), raw)
                data = b"" if body is None else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("X-Elastic-Product", "Elasticsearch")
                    self.send_header("Content-Type", f"application/vnd.elasticsearch+json;compatible-with={fake.major}")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped waiting (stall_answers): the server's answer goes nowhere

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- faults -----------------------------------------------------------------
    def fail_requests(self, status: int, body: dict, times: int = 1, path: str = "/_bulk",
                      method: str | None = None) -> None:
        self.request_faults.append((lambda m, p: p.split("?")[0].endswith(path) and method in (None, m),
                                    status, body, times))

    def make_index(self, name: str, alias: str | None, mappings: dict[str, Any],
                   settings: dict[str, Any] | None = None) -> None:
        """An index as an earlier deepwatch (or an admin) left it: ``mappings``
        as they are (``properties``, ``dynamic``, ``_meta``) and ``settings``
        (``{"analysis": ...}``), behind ``alias``."""
        with self.lock:
            self.docs[name], self.meta[name] = {}, {}
            self.index_mappings[name] = json.loads(json.dumps(mappings))
            self._set_settings(name, _flat_settings(settings or {}))
            if alias:
                self.aliases[alias] = name

    def make_data_stream(self, name: str, mappings: dict[str, Any], settings: dict[str, Any] | None = None,
                         docs: dict[str, dict] | None = None) -> str:
        """A data stream as an earlier deepwatch left it: one backing index with
        ``mappings`` and ``settings`` as they are, holding ``docs``; its name."""
        with self.lock:
            backing = f".ds-{name}-2025.06.01-000001"
            self.data_streams[name] = backing
            self.stream_backing[name] = [backing]
            self.make_index(backing, None, mappings, settings)
            for doc_id, src in (docs or {}).items():
                self._write(backing, doc_id, src, "created")
            return backing

    def fail_items(self, match: Callable[[str, dict, dict | None], bool], status: int, error: dict, times: int = 1) -> None:
        self.item_faults.append(ItemFault(match, status, error, times))

    def time_out_searches(self, index_suffix: str = "", times: int = 1) -> None:
        """The next ``times`` searches of an index expression ending in
        ``index_suffix`` that carry a ``timeout`` (their own, or the
        cluster's ``default_search_timeout``) answer as Elasticsearch
        does when its shards ran out of that time (search-your-data,
        "search timeout"): 200 with ``"timed_out": true`` and whatever they
        had collected by then; here everything, the worst case for a reader
        that does not look at the flag."""
        self.search_timeouts.append([index_suffix, times])

    def fail_shards(self, index: str, reason: str = "no_shard_available_action_exception", times: int = 1) -> None:
        """The next ``times`` searches that cover the concrete ``index`` (one
        shard here) answer without it, as Elasticsearch does by default
        when a shard fails or has no copy available (a node left, a thread
        pool refused): 200, its hits and buckets missing, ``_shards.failed``
        counting it and ``_shards.failures`` saying why
        (``allow_partial_search_results`` defaults to true, search-search)."""
        self.shard_faults.append([index, reason, times])

    def stall_searches(self, seconds: float, times: int = 1) -> None:
        """The next ``times`` searches answer only after ``seconds`` (a
        slow or overloaded cluster: the answer comes, late)."""
        self.search_stalls.append([seconds, times])

    def stall_answers(self, seconds: float, times: int = 1, path_suffix: str = "/_bulk") -> None:
        """The next ``times`` requests to a path ending in ``path_suffix``
        are applied at once and answered only after ``seconds``: a client
        that stops waiting sooner (its request timeout) never learns that
        its writes were stored, as with a cluster that applies a bulk
        request and is slow to answer, or a proxy that gives up first."""
        self.answer_stalls.append([path_suffix, seconds, times])

    def calls(self, method: str, path_suffix: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.split("?")[0].endswith(path_suffix)]

    # -- dispatch ---------------------------------------------------------------
    def handle(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        parts = urlsplit(target)
        path = unquote(parts.path)
        params = parse_qs(parts.query)
        lower = {k.lower(): v for k, v in headers.items()}
        body: Any = None
        if raw:
            text = raw.decode()
            if path.endswith("/_bulk"):
                body = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                body = json.loads(text)
        rec = Recorded(method, path, params, lower, body, len(raw))
        with self.lock:
            self.requests.append(rec)
            if self.max_body_bytes is not None and len(raw) > self.max_body_bytes:
                return 413, "<html><head><title>413 Request Entity Too Large</title></head></html>"
        if path.endswith("/_search"):
            stall = 0.0
            with self.lock:
                for fault in self.search_stalls:
                    if fault[1] > 0:
                        fault[1] -= 1
                        stall = fault[0]
                        break
            if stall:
                import time

                time.sleep(stall)
        with self.lock:
            bad = self._check_compat(lower)
            if bad is not None:
                return 400, bad
            for i, (match, status, fbody, times) in enumerate(self.request_faults):
                if times > 0 and match(method, path):
                    self.request_faults[i] = (match, status, fbody, times - 1)
                    return status, fbody
            try:
                answer = self._route(method, path, params, body, rec)
            except _Err as e:
                answer = e.status, e.body
            except Exception as e:  # a gap in the fake: make it loud, not a hang-up
                import traceback

                self.crashes.append(traceback.format_exc())
                return 500, error_body("fake_es_crash", f"{type(e).__name__}: {e}", 500)
            late = 0.0
            for fault in self.answer_stalls:
                if fault[2] > 0 and path.endswith(fault[0]):
                    fault[2] -= 1
                    late = fault[1]
                    break
        if late:  # applied; the answer waits (outside the lock: other requests go on meanwhile)
            import time

            time.sleep(late)
        return answer

    def _check_compat(self, h: dict[str, str]) -> dict | None:
        """ES 8 accepts compatible-with 7 or 8; ES 9 accepts 8 or 9."""
        for name in ("accept", "content-type"):
            m = re.search(r"compatible-with=(\d+)", h.get(name, ""))
            if m and int(m.group(1)) not in (self.major - 1, self.major):
                label = "Accept" if name == "accept" else "Content-Type"
                cause = {"type": "status_exception",
                         "reason": f"{label} version must be either version {self.major} or {self.major - 1}, but found "
                                   f"{m.group(1)}. {label}={h.get(name)}"}
                return {"error": {"root_cause": [{"type": "media_type_header_exception",
                                                  "reason": "Invalid media-type value on headers [Accept, Content-Type]"}],
                                  "type": "media_type_header_exception",
                                  "reason": "Invalid media-type value on headers [Accept, Content-Type]",
                                  "caused_by": cause}, "status": 400}
        return None

    def _route(self, method: str, path: str, params: dict, body: Any, rec: Recorded) -> tuple[int, Any]:
        seg = [s for s in path.split("/") if s]
        ack = {"acknowledged": True}
        if not seg and method in ("GET", "HEAD"):
            return 200, self._info()
        if seg[0] == "_ilm" and seg[1:2] == ["policy"] and method == "PUT":
            self.ilm[seg[2]] = body
            return 200, ack
        if seg[0] == "_ilm" and seg[1:2] == ["policy"] and method == "GET" and len(seg) == 3:
            # ilm-get-lifecycle: the policy as the server keeps it, defaults filled in
            # (a phase's min_age), so a body sent cannot be compared with it as it is
            if seg[2] not in self.ilm:
                raise _Err(404, error_body("resource_not_found_exception", f"Lifecycle policy not found: [{seg[2]}]", 404))
            policy = json.loads(json.dumps(self.ilm[seg[2]]["policy"]))
            for phase in policy.get("phases", {}).values():
                phase.setdefault("min_age", "0ms")
            return 200, {seg[2]: {"version": 1, "modified_date": "2026-01-01T00:00:00.000Z", "policy": policy,
                                  "in_use_by": {"indices": [], "data_streams": [], "composable_templates": []}}}
        if seg[0] == "_component_template" and method == "PUT":
            # validated on its own (MetadataIndexTemplateService.addComponentTemplate): its
            # mappings against its own settings, so an analyzer or normalizer another
            # component template defines is "not configured" here
            t = body.get("template") or {}
            analysis = _nested_analysis(_flat_settings(t.get("settings") or {}))
            for cf in (analysis.get("char_filter") or {}).values():  # its rules parse (the index's analysis is built)
                if cf.get("type") == "mapping":
                    _mapping_char_filter(tuple(cf.get("mappings") or ()))
            refusal = _analysis_refusal((t.get("mappings") or {}).get("properties") or {}, analysis)
            if refusal is not None:
                raise refusal
            self.component_templates[seg[1]] = body
            return 200, ack
        if seg[0] in ("_component_template", "_index_template") and method == "GET" and len(seg) == 2:
            kind = seg[0][1:]
            store = self.component_templates if kind == "component_template" else self.index_templates
            if seg[1] not in store:
                what = "component template" if kind == "component_template" else "index template"
                raise _Err(404, error_body("resource_not_found_exception", f"{what} matching [{seg[1]}] not found", 404))
            t = json.loads(json.dumps(store[seg[1]]))
            settings = (t.get("template") or {}).get("settings")
            if settings and "index" not in settings:  # as the server normalizes settings
                t["template"]["settings"] = {"index": settings}
            return 200, {f"{kind}s": [{"name": seg[1], kind: t}]}
        if seg[0] == "_scripts" and method == "GET" and len(seg) == 2:
            if seg[1] not in self.scripts:
                return 404, {"_id": seg[1], "found": False}
            return 200, {"_id": seg[1], "found": True, "script": self.scripts[seg[1]]}
        if seg[0] == "_index_template" and method == "PUT":
            missing = [c for c in body.get("composed_of", []) if c not in self.component_templates]
            if missing:
                raise _Err(400, error_body("illegal_argument_exception",
                                           f"index template [{seg[1]}] specifies component templates {missing} that do not exist", 400))
            self.index_templates[seg[1]] = body
            return 200, ack
        if seg[0] == "_scripts" and method in ("PUT", "POST"):
            self.scripts[seg[1]] = body["script"]
            return 200, ack
        if seg[0] == "_alias" and method == "HEAD":
            return (200 if seg[1] in self.aliases else 404), None
        if seg[0] == "_data_stream" and method == "PUT":
            name = seg[1]
            if name in self.data_streams:
                raise _Err(400, error_body("resource_already_exists_exception", f"data_stream [{name}] already exists", 400))
            self._create_data_stream(name)
            return 200, ack
        if len(seg) == 2 and seg[1] == "_rollover" and method == "POST" and _flag(params, "lazy"):
            # indices-rollover-index, ``lazy``: only marks a data stream to roll over on its next write
            if seg[0] not in self.data_streams:
                raise _Err(400, error_body("illegal_argument_exception", "Lazy rollover can be applied only on a data "
                                                                         "stream. Please remove the query parameter 'lazy'.", 400))
            self.rollover_on_write.add(seg[0])
            old = self.data_streams[seg[0]]
            return 200, {"acknowledged": True, "shards_acknowledged": False, "old_index": old,
                         "new_index": f"{old.rsplit('-', 1)[0]}-{len(self.stream_backing[seg[0]]) + 1:06d}",
                         "rolled_over": False, "dry_run": False, "lazy": True, "conditions": {}}
        if len(seg) == 2 and seg[1] == "_rollover" and method == "POST" and seg[0] in self.data_streams:
            return 200, self._rollover(seg[0])
        if seg[-1] == "_bulk" and method in ("POST", "PUT"):
            return 200, self._bulk(body)
        if len(seg) == 2 and seg[1] == "_search" and method in ("GET", "POST"):
            return 200, self._search(seg[0], body or {})
        if len(seg) == 2 and seg[1] == "_refresh" and method in ("GET", "POST"):
            self._targets(seg[0])
            return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}
        if len(seg) == 2 and seg[1] == "_mapping" and method in ("PUT", "POST"):
            targets = self._targets(seg[0])  # 404 for an index or alias that is not there
            for index in targets:  # the analyzers and normalizers it names: in the index's own settings
                refusal = _analysis_refusal(body.get("properties") or {}, self.index_analysis.get(index, {}))
                if refusal is not None:
                    raise refusal
            for index in targets:  # all or nothing: a type or parameter conflict refuses the request
                _merge_mapping(self.mappings(index)["properties"], body.get("properties") or {}, "")
            for index in targets:
                m = self.index_mappings.setdefault(index, self.mappings(index))
                m["properties"] = json.loads(json.dumps(m["properties"]))
                _merge_mapping(m["properties"], body.get("properties") or {}, "", apply=True)
                if "_meta" in body:
                    m["_meta"] = body["_meta"]
                if "dynamic" in body:
                    m["dynamic"] = body["dynamic"]
            self.put_mappings.append((seg[0], body.get("properties") or {}))
            return 200, ack
        if len(seg) == 2 and seg[1] == "_settings" and method == "PUT":
            static = sorted(k for k in _flat_settings(body or {}) if k.startswith("index.analysis."))
            if static:  # index-modules-analysis: analysis settings are static (a closed index only)
                indices = ", ".join(f"[{i}/fakeuuid]" for i in self._targets(seg[0]))
                raise _Err(400, error_body("illegal_argument_exception",
                                           f"Can't update non dynamic settings [[{', '.join(static)}]] for open indices "
                                           f"[{indices}]", 400))
        if len(seg) == 2 and seg[1] == "_mapping" and method == "GET":
            return 200, {index: {"mappings": json.loads(json.dumps(self.mappings(index)))} for index in self._targets(seg[0])}
        if len(seg) == 3 and seg[1] == "_doc" and method == "GET":
            return self._get(seg[0], seg[2])
        if len(seg) == 1 and method == "PUT" and not seg[0].startswith("_"):
            return self._create_index(seg[0], body or {})
        self.unhandled.append(rec)
        return 400, {"error": f"no handler found for uri [{path}] and method [{method}]"}

    def _info(self) -> dict[str, Any]:
        return {
            "name": "fake-node-0", "cluster_name": "deepwatch-fake", "cluster_uuid": "3B4tLZwcSZOUCxjIZcyF-A",
            "version": {"number": self.version, "build_flavor": "default", "build_type": "docker",
                        "build_hash": "0000000000000000000000000000000000000000",
                        "build_date": "2025-01-01T00:00:00.000000000Z", "build_snapshot": False,
                        "lucene_version": "10.2.2" if self.major >= 9 else "9.11.1",
                        "minimum_wire_compatibility_version": "8.19.0" if self.major >= 9 else "7.17.0",
                        "minimum_index_compatibility_version": "8.0.0" if self.major >= 9 else "7.0.0"},
            "tagline": "You Know, for Search",
        }

    # -- indices ----------------------------------------------------------------
    def _template_for(self, index: str) -> dict | None:
        best = None
        for name, t in self.index_templates.items():
            if any(fnmatch.fnmatchcase(index, p) for p in t["index_patterns"]):
                if best is None or t.get("priority", 0) > best.get("priority", 0):
                    best = t
        return best

    def mappings(self, index: str) -> dict[str, Any]:
        """The index's own mapping: the templates' as they were when it was
        made (a template changed later applies to new indices only), then
        what ``PUT _mapping`` added."""
        if index in self.index_mappings:
            return self.index_mappings[index]
        return self._template_mappings(index)

    def _template_mappings(self, index: str) -> dict[str, Any]:
        stream = next((n for n, bs in self.stream_backing.items() if index in bs), None)
        t = self._template_for(stream or index)
        props: dict[str, Any] = {}
        dynamic: Any = True
        meta: dict[str, Any] | None = None
        for c in (t or {}).get("composed_of", []):
            m = self.component_templates[c].get("template", {}).get("mappings", {})
            props.update(m.get("properties", {}))
            dynamic = m.get("dynamic", dynamic)
            meta = m.get("_meta", meta)
        out = json.loads(json.dumps({"properties": props, "dynamic": dynamic}))
        if meta is not None:
            out["_meta"] = meta
        return out

    def _template_settings(self, index: str) -> dict[str, Any]:
        """The settings the templates give a new index (flat): its component
        templates' in order, then the index template's own."""
        stream = next((n for n, bs in self.stream_backing.items() if index in bs), None)
        t = self._template_for(stream or index) or {}
        out: dict[str, Any] = {}
        for c in t.get("composed_of", []):
            out.update(_flat_settings(self.component_templates[c].get("template", {}).get("settings") or {}))
        out.update(_flat_settings((t.get("template") or {}).get("settings") or {}))
        return out

    def _set_settings(self, index: str, flat: dict[str, Any]) -> None:
        self.index_settings[index] = flat
        self.index_analysis[index] = _nested_analysis(flat)

    def _create_index(self, name: str, body: dict) -> tuple[int, Any]:
        if name in self.docs or name in self.aliases:
            raise _Err(400, error_body("resource_already_exists_exception", f"index [{name}/fakeuuid] already exists", 400,
                                       index_uuid="fakeuuid", index=name))
        self.docs[name], self.meta[name] = {}, {}
        self.index_mappings[name] = self._template_mappings(name)
        self._set_settings(name, {**self._template_settings(name), **_flat_settings(body.get("settings") or {})})
        for alias in (body.get("aliases") or {}):
            self.aliases[alias] = name
        return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}

    def _create_data_stream(self, name: str) -> None:
        t = self._template_for(name)
        if t is None or "data_stream" not in t:
            raise _Err(400, error_body("illegal_argument_exception", f"no matching index template found for data stream [{name}]", 400))
        backing = f".ds-{name}-2026.01.01-000001"
        self.data_streams[name] = backing
        self.stream_backing[name] = [backing]
        self.docs[backing], self.meta[backing] = {}, {}
        self.index_mappings[backing] = self._template_mappings(backing)
        self._set_settings(backing, self._template_settings(backing))

    def _rollover(self, name: str) -> dict[str, Any]:
        """A new write index for the stream (unconditional, as ``POST
        <stream>/_rollover`` with no body): ids are unique per backing index
        only, so a ``create`` of an id written before now succeeds again."""
        old = self.data_streams[name]
        new = f"{old.rsplit('-', 1)[0]}-{len(self.stream_backing[name]) + 1:06d}"
        self.data_streams[name] = new
        self.stream_backing[name].append(new)
        self.docs[new], self.meta[new] = {}, {}
        self.index_mappings[new] = self._template_mappings(new)
        self._set_settings(new, self._template_settings(new))
        self.rollover_on_write.discard(name)
        return {"acknowledged": True, "shards_acknowledged": True, "old_index": old, "new_index": new,
                "rolled_over": True, "dry_run": False, "lazy": False, "conditions": {}}

    def _resolve(self, name: str, *, auto_create_stream: bool = False) -> str:
        if name in self.aliases:
            return self.aliases[name]
        if name in self.data_streams:
            return self.data_streams[name]
        if name in self.docs:
            return name
        if auto_create_stream:
            t = self._template_for(name)
            if t is not None and "data_stream" in t:
                self._create_data_stream(name)
                return self.data_streams[name]
        raise _Err(404, error_body("index_not_found_exception", f"no such index [{name}]", 404,
                                   **{"resource.type": "index_or_alias", "resource.id": name, "index_uuid": "_na_",
                                      "index": name}))

    def _targets(self, expr: str) -> list[str]:
        """The concrete indices a read of ``expr`` covers: every backing index of a data stream."""
        return [i for n in expr.split(",") for i in self.stream_backing.get(n) or [self._resolve(n)]]

    def _get(self, name: str, doc_id: str) -> tuple[int, Any]:
        index = self._resolve(name)
        if doc_id not in self.docs[index]:
            return 404, {"_index": index, "_id": doc_id, "found": False}
        m = self.meta[index][doc_id]
        return 200, {"_index": index, "_id": doc_id, "_version": m["version"], "_seq_no": m["seq"],
                     "_primary_term": 1, "found": True, "_source": self.docs[index][doc_id]}

    # -- bulk -------------------------------------------------------------------
    def _bulk(self, lines: list[dict]) -> dict[str, Any]:
        # Request validation refuses the whole bulk request, not the one item
        # (IndexRequest.validate; elastic/elasticsearch#54549).
        headers, i = [], 0
        while i < len(lines):
            op, meta = next(iter(lines[i].items()))
            headers.append(meta)
            i += 1 if op == "delete" else 2
        too_long = [m.get("_id") for m in headers if len(str(m.get("_id") or "").encode()) > 512]
        if too_long:
            n = len(str(too_long[0]).encode())
            raise _Err(400, error_body("action_request_validation_exception",
                                       f"Validation Failed: 1: id [{too_long[0]}] is too long, must be no longer "
                                       f"than 512 bytes but was: {n};", 400))
        items = []
        i = 0
        while i < len(lines):
            header = lines[i]
            op, meta = next(iter(header.items()))
            source = None
            if op != "delete":
                source = lines[i + 1]
                i += 2
            else:
                i += 1
            items.append({op: self._bulk_item(op, meta, source)})
        errors = any("error" in next(iter(it.values())) for it in items)
        return {"took": 3, "errors": errors, "items": items}

    def _bulk_item(self, op: str, meta: dict, source: dict | None) -> dict[str, Any]:
        name, doc_id = meta["_index"], meta.get("_id")
        for f in self.item_faults:
            if f.times > 0 and f.match(op, meta, source):
                f.times -= 1
                return {"_index": name, "_id": doc_id, "status": f.status, "error": f.error}
        try:
            if op == "delete":  # docs-bulk: 200 "deleted", or 404 "not_found" (no error) for a document not there
                index = self._resolve(name)
                self._seq += 1
                found = self.docs[index].pop(doc_id, None) is not None
                version = self.meta[index].pop(doc_id, {"version": 0})["version"] + 1
                return {"_index": index, "_id": doc_id, "_version": version,
                        "result": "deleted" if found else "not_found", "_seq_no": self._seq, "_primary_term": 1,
                        "status": 200 if found else 404}
            if name in self.rollover_on_write and name in self.data_streams:
                self._rollover(name)  # a lazy rollover happens on the stream's next write
            index = self._resolve(name, auto_create_stream=True)
            is_stream = name in self.data_streams
            if is_stream and op != "create":
                raise _Err(400, {"type": "illegal_argument_exception",
                                 "reason": "only write ops with an op_type of create are allowed in data streams"})
            docs = self.docs[index]
            if op == "create":
                if doc_id in docs:
                    m = self.meta[index][doc_id]
                    raise _Err(409, {"type": "version_conflict_engine_exception",
                                     "reason": f"[{doc_id}]: version conflict, document already exists (current version [{m['version']}])",
                                     "index_uuid": "fakeuuid", "shard": "0", "index": index})
                self._validate(index, source, is_stream)
                return self._write(index, doc_id, source, "created")
            if op == "index":
                self._validate(index, source, is_stream)
                return self._write(index, doc_id, source, "updated" if doc_id in docs else "created")
            if op == "update":
                return self._update(index, doc_id, source)
            raise _Err(400, {"type": "illegal_argument_exception", "reason": f"fake does not do [{op}]"})
        except _Err as e:
            err = e.body.get("error", e.body) if isinstance(e.body, dict) else e.body
            if isinstance(err, dict):
                err = {k: v for k, v in err.items() if k != "root_cause"}
            return {"_index": name, "_id": doc_id, "status": e.status, "error": err}

    def _write(self, index: str, doc_id: str | None, source: dict, result: str) -> dict[str, Any]:
        self._seq += 1
        if doc_id is None:
            doc_id = f"auto{self._seq}"
        prev = self.meta[index].get(doc_id, {"version": 0})
        self.docs[index][doc_id] = json.loads(json.dumps(source))
        self.meta[index][doc_id] = {"version": prev["version"] + 1, "seq": self._seq}
        return {"_index": index, "_id": doc_id, "_version": prev["version"] + 1, "result": result,
                "_shards": {"total": 2, "successful": 1, "failed": 0}, "_seq_no": self._seq, "_primary_term": 1,
                "status": 201 if result == "created" else 200}

    def _update(self, index: str, doc_id: str, body: dict) -> dict[str, Any]:
        docs = self.docs[index]
        script = body.get("script")
        exists = doc_id in docs
        if script is None:
            raise _Err(400, {"type": "illegal_argument_exception", "reason": "fake only does scripted updates"})
        if "source" in script:  # an inline script: only the ones deepwatch sends, emulated by their exact source
            if script.get("lang", "painless") != "painless":
                raise _Err(400, {"type": "illegal_argument_exception", "reason": f"script_lang not supported [{script['lang']}]"})
            run = _INLINE_SCRIPTS.get(script["source"])
            if run is None:
                raise _Err(400, {"type": "illegal_argument_exception", "reason": "fake emulates only deepwatch's inline scripts"})
        else:
            sid = script.get("id")
            stored = self.scripts.get(sid)
            if stored is None:  # ResourceNotFoundException: RestStatus.NOT_FOUND
                raise _Err(404, {"type": "resource_not_found_exception", "reason": f"unable to find script [{sid}] in cluster state"})
            if sid != T.SCRIPT_ID or stored.get("source") != T.CLUSTER_UPSERT_SCRIPT:
                raise _Err(400, {"type": "illegal_argument_exception", "reason": "fake emulates only deepwatch's cluster upsert script"})
            run = _cluster_upsert
        if not exists and not body.get("scripted_upsert"):
            # docs-update: a missing document gets the ``upsert`` content as it is, the script
            # not run; without one the update fails
            if "upsert" not in body:
                raise _Err(404, {"type": "document_missing_exception", "reason": f"[{doc_id}]: document missing",
                                 "index_uuid": "fakeuuid", "shard": "0", "index": index})
            upsert = json.loads(json.dumps(body["upsert"]))
            self._validate(index, upsert, False)
            return self._write(index, doc_id, upsert, "created")
        src = json.loads(json.dumps(docs[doc_id])) if exists else json.loads(json.dumps(body.get("upsert") or {}))
        op = run(src, script.get("params") or {})
        if op == "noop":
            m = self.meta[index][doc_id]
            return {"_index": index, "_id": doc_id, "_version": m["version"], "result": "noop",
                    "_shards": {"total": 0, "successful": 0, "failed": 0}, "_seq_no": m["seq"], "_primary_term": 1,
                    "status": 200}
        self._validate(index, src, False)
        return self._write(index, doc_id, src, "updated" if exists else "created")

    # -- mapping checks ---------------------------------------------------------
    def _validate(self, index: str, source: dict, is_stream: bool) -> None:
        m = self.mappings(index)
        if is_stream and "@timestamp" not in source:
            raise _Err(400, {"type": "document_parsing_exception",
                             "reason": "[1:2] failed to parse: data stream timestamp field [@timestamp] is missing"})
        self._check_object(source, m["properties"], m["dynamic"], "")

    def _check_object(self, obj: dict, props: dict, dynamic: Any, prefix: str) -> None:
        for key, value in obj.items():
            path = prefix + key
            spec = props.get(key)
            if spec is None:
                if dynamic == "strict":
                    raise _Err(400, {"type": "strict_dynamic_mapping_exception",
                                     "reason": f"[1:2] mapping set to strict, dynamic introduction of [{key}] within "
                                               f"[{prefix.rstrip('.') or '_doc'}] is not allowed"})
                continue
            for v in (value if isinstance(value, list) and spec.get("type") != "dense_vector" else [value]):
                self._check_value(v, spec, path, dynamic)

    def _check_value(self, v: Any, spec: dict, path: str, parent_dynamic: Any = True) -> None:
        if v is None:
            return
        kind = spec.get("type", "object")
        bad = lambda: _Err(400, {"type": "document_parsing_exception",  # noqa: E731
                                 "reason": f"[1:2] failed to parse field [{path}] of type [{kind}]",
                                 "caused_by": {"type": "illegal_argument_exception", "reason": f"bad value {v!r}"}})
        if kind in ("object", "nested"):
            if spec.get("enabled") is False:
                return
            if not isinstance(v, dict):
                raise bad()
            # an object without its own ``dynamic`` inherits its parent's (as ES does)
            self._check_object(v, spec.get("properties", {}), spec.get("dynamic", parent_dynamic), path + ".")
        elif kind in ("integer", "long", "float"):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                try:
                    float(v)
                except (TypeError, ValueError):
                    raise bad() from None
        elif kind == "date":
            try:
                datetime.fromisoformat(str(v).replace("Z", "+00:00"))
            except ValueError:
                raise bad() from None
        elif kind == "boolean":
            if not isinstance(v, bool):
                raise bad()
        elif kind == "dense_vector":
            if not isinstance(v, str) or len(v) * 4 != spec["dims"] or not re.fullmatch(r"[0-9a-f]*", v):
                raise bad()
        elif kind in ("keyword", "text") and isinstance(v, (dict, list)):
            raise bad()

    # -- search -----------------------------------------------------------------
    def _search(self, expr: str, body: dict) -> dict[str, Any]:
        # index.max_result_window (default 10,000) bounds from + size, search_after
        # or not: a larger window is refused, not truncated (search-request-from-size)
        window = body.get("from", 0) + body.get("size", 10)
        if window > MAX_RESULT_WINDOW:
            raise _Err(400, _search_phase_error(
                "illegal_argument_exception",
                f"Result window is too large, from + size must be less than or equal to: [{MAX_RESULT_WINDOW}] but was "
                f"[{window}]. See the scroll api for a more efficient way to request large data sets. This limit can be "
                "set by changing the [index.max_result_window] index level setting."))
        timeout = body.get("timeout")
        if timeout is not None and not (isinstance(timeout, str) and _TIME_VALUE.fullmatch(timeout)):
            # a time value with its unit (api-conventions, time units); "-1" is none
            raise _Err(400, error_body("parse_exception", f"failed to parse setting [timeout] with value [{timeout}] as "
                                                          "a time value: unit is missing or unrecognized", 400))
        indices = self._targets(expr)
        failures: list[dict[str, Any]] = []
        for fault in self.shard_faults:
            if fault[2] > 0 and fault[0] in indices:
                fault[2] -= 1
                failures.append({"shard": 0, "index": fault[0], "node": None,
                                 "reason": {"type": fault[1], "reason": f"No shard available for [{fault[0]}][0]"}})
        shards = {"total": len(indices), "successful": len(indices) - len(failures), "skipped": 0,
                  "failed": len(failures)}
        if failures:
            shards["failures"] = failures
        answering = [i for i in indices if i not in {f["index"] for f in failures}]
        # each index's mapping, and the analysis its settings define (``_analysis``: the fake's own key)
        mappings = {i: {**self.mappings(i), "_analysis": self.index_analysis.get(i, {})} for i in indices}
        self._df_memo = {}
        docs = [(i, did, src) for i in answering for did, src in self.docs[i].items()]
        query = body.get("query") or {"match_all": {}}
        scored: dict[tuple[str, str], float] = {}
        for i, did, src in docs:
            ok, score = self._eval(query, src, mappings[i], docs, did)
            if ok:
                scored[(i, did)] = score
        knn = body.get("knn")
        if knn:
            for clause in (knn if isinstance(knn, list) else [knn]):
                ranked = []
                for i, did, src in docs:
                    if "filter" in clause and not self._eval(clause["filter"], src, mappings[i], docs)[0]:
                        continue
                    s = _knn_score(src, clause["field"], clause["query_vector"])
                    if s is not None:
                        ranked.append((s, i, did))
                ranked.sort(key=lambda t: (-t[0], t[2]))
                for s, i, did in ranked[: clause["k"]]:
                    scored[(i, did)] = scored.get((i, did), 0.0) + s
            if not body.get("query"):
                scored = {k: v for k, v in scored.items() if v > 0}
        by_key = {(i, did): src for i, did, src in docs}
        hits = [{"_index": i, "_id": did, "_score": s, "_source": by_key[(i, did)]} for (i, did), s in scored.items()]
        sort = body.get("sort")
        if sort:
            hits.sort(key=lambda h: _sort_key(h, sort))
            for h in hits:
                h["sort"] = [_sort_value(h, s) for s in sort]
            if body.get("search_after") is not None:
                after = tuple(_cmp_key(v, o) for v, o in zip(body["search_after"], _orders(sort)))
                hits = [h for h in hits if _sort_key(h, sort) > after]
        else:
            hits.sort(key=lambda h: (-h["_score"], h["_id"]))
        if body.get("collapse"):
            f, seen, kept = body["collapse"]["field"], set(), []
            for h in hits:
                vals = _values(h["_source"], f)
                key = vals[0] if vals else None
                if key in seen:
                    continue
                seen.add(key)
                kept.append(h)
            hits = kept
        # hits.total counts matching documents, not collapsed groups
        # (collapse-search-results), exactly only up to track_total_hits
        # (default 10,000; beyond it "gte" and the bound)
        total, relation = len(scored), "eq"
        track = body.get("track_total_hits", MAX_RESULT_WINDOW)
        if track is not True and total > int(track):
            total, relation = int(track), "gte"
        frm, size = body.get("from", 0), body.get("size", 10)
        page = hits[frm: frm + size]
        src_filter = body.get("_source", True)
        out_hits = []
        for h in page:
            hit = {"_index": h["_index"], "_id": h["_id"],
                   "_score": h["_score"] if (not sort or body.get("track_scores")) else None,
                   "_source": _filter_source(h["_source"], src_filter)}
            if "sort" in h:
                hit["sort"] = h["sort"]
            out_hits.append(hit)
        resp: dict[str, Any] = {
            "took": 2, "timed_out": False, "_shards": shards,
            "hits": {"total": {"value": total, "relation": relation},
                     "max_score": max((h["_score"] for h in out_hits if h["_score"] is not None), default=None),
                     "hits": out_hits},
        }
        if body.get("aggs"):
            matched = [(k[0], by_key[k]) for k in scored]
            self._scores = {id(by_key[k]): v for k, v in scored.items()}  # for a max of the script "_score"
            resp["aggregations"] = self._aggs(body["aggs"], matched, mappings, docs)
        # a request without its own ``timeout`` gets the cluster's ``search.default_search_timeout``
        timeout = timeout if timeout is not None else self.default_search_timeout
        if timeout is not None and timeout != "-1":
            for fault in self.search_timeouts:
                if fault[1] > 0 and expr.endswith(fault[0]):
                    fault[1] -= 1
                    resp["timed_out"] = True
                    break
        return resp

    def _eval(self, q: dict, src: dict, mapping: dict, corpus: list, did: str | None = None) -> tuple[bool, float]:
        kind, spec = next(iter(q.items()))
        props = mapping["properties"]
        if kind == "match_all":
            return True, 1.0
        if kind == "bool":
            score = 0.0
            for c in spec.get("must", []):
                ok, s = self._eval(c, src, mapping, corpus, did)
                if not ok:
                    return False, 0.0
                score += s
            for c in spec.get("filter", []):
                if not self._eval(c, src, mapping, corpus, did)[0]:
                    return False, 0.0
            for c in spec.get("must_not", []):
                if self._eval(c, src, mapping, corpus, did)[0]:
                    return False, 0.0
            should = spec.get("should", [])
            if should:
                results = [self._eval(c, src, mapping, corpus, did) for c in should]
                hits = sum(1 for ok, _ in results if ok)
                default_min = 0 if (spec.get("must") or spec.get("filter")) else 1
                if hits < spec.get("minimum_should_match", default_min):
                    return False, 0.0
                score += sum(s for ok, s in results if ok)
            return True, score
        if kind == "term":
            # query-dsl-term-query: ``case_insensitive`` (7.10+) folds case at query time,
            # as the field's normalizer does at index time
            f, v = next(iter(spec.items()))
            fold = isinstance(v, dict) and bool(v.get("case_insensitive"))
            v = v["value"] if isinstance(v, dict) else v
            return self._term(src, f, [v], props, fold), 1.0
        if kind == "terms":
            f, vs = next(iter(spec.items()))
            if len(vs) > MAX_TERMS_COUNT:  # index.max_terms_count (query-dsl-terms-query)
                raise _Err(400, _search_phase_error(
                    "illegal_argument_exception",
                    f"The number of terms [{len(vs)}] used in the Terms Query request has exceeded the allowed maximum of "
                    f"[{MAX_TERMS_COUNT}]. This maximum can be set by changing the [index.max_terms_count] index level setting."))
            return self._term(src, f, list(vs), props), 1.0
        if kind == "ids":
            return did in spec["values"], 1.0
        if kind == "range":
            f, r = next(iter(spec.items()))
            ftype = _field_spec(props, f).get("type")
            is_date = ftype == "date"
            epoch_ms = r.get("format") == "epoch_millis"
            bound = (lambda b: float(b) / 1000) if (is_date and epoch_ms) else (lambda b: _as_num(b, is_date))  # noqa: E731
            if ftype == "keyword":  # term-range-query on a keyword: its terms' order (UTF-8 bytes: code points)
                bound = str
            for v in _values(src, f):
                x = str(v) if ftype == "keyword" else _as_num(v, is_date)
                if all(_range_ok(x, op, bound(b)) for op, b in r.items() if op in ("gt", "gte", "lt", "lte")):
                    return True, 1.0
            return False, 0.0
        if kind == "wildcard":
            # query-dsl-wildcard-query: the whole value matches the pattern; case_insensitive
            # (7.10+) folds case, as does the field's normalizer. Doc-values-only keywords
            # (index: false) answer too, by a scan (elastic/elasticsearch#83404).
            f, w = next(iter(spec.items()))
            w = w if isinstance(w, dict) else {"value": w}
            fold = bool(w.get("case_insensitive")) or bool(_field_spec(props, f).get("normalizer"))
            return any(_wildcard_match(w["value"], str(v), fold) for v in _values(src, f)), 1.0
        if kind == "exists":
            return bool(_values(src, spec["field"])), 1.0
        if kind == "nested":
            path = spec["path"]
            for obj in _as_list(src.get(path)):
                ok, s = self._eval(spec["query"], {path: obj}, mapping, corpus)
                if ok:
                    return True, s
            return False, 0.0
        if kind == "multi_match":
            # each field's text analyzed by its index analyzer, the query by its search one
            # (query-dsl-match-query-phrase): an index made before an analyzer changed answers
            # with the one it was made with
            assert spec.get("type") == "phrase", "deepwatch sends phrase multi_match"
            best = 0.0
            for f in spec["fields"]:
                hits, ntoks = self._phrase_hits(src, f, spec["query"], mapping)
                if hits:
                    key = (f, spec["query"])
                    if key not in self._df_memo:
                        self._df_memo[key] = sum(1 for ci, _d, s in corpus
                                                 if self._phrase_hits(s, f, spec["query"], self._with_analysis(ci))[0])
                    df = self._df_memo[key]
                    best = max(best, hits / (1 + ntoks / 10) * math.log(1 + len(corpus) / max(1, df)))
            return best > 0, best
        raise AssertionError(f"fake ES: query type {kind!r} not implemented")

    def _with_analysis(self, index: str) -> dict[str, Any]:
        return {**self.mappings(index), "_analysis": self.index_analysis.get(index, {})}

    @staticmethod
    def _phrase_hits(src: dict, f: str, query: str, mapping: dict) -> tuple[int, int]:
        """How often the phrase ``query`` occurs in field ``f`` of ``src`` (the
        best value of an array), and that value's token count: (0, 0) when
        the field is not text in this index's mapping."""
        spec = _field_spec(mapping["properties"], f)
        if spec.get("type") != "text" or spec.get("index") is False:
            return 0, 0
        analysis = mapping.get("_analysis") or {}
        search = spec.get("search_quote_analyzer") or spec.get("search_analyzer") or spec.get("analyzer")
        phrase = list(analyze(str(query), resolve_analyzer(search, analysis)))
        at_index = resolve_analyzer(spec.get("analyzer"), analysis)
        best = (0, 0)
        for v in _values(src, f):
            toks = list(analyze(str(v), at_index))
            n = _phrase_count(toks, phrase)
            if n > best[0]:
                best = (n, len(toks))
        return best

    def _term(self, src: dict, f: str, wanted: list, props: dict, fold: bool = False) -> bool:
        spec = _field_spec(props, f)
        norm = (lambda x: str(x).lower()) if (fold or spec.get("normalizer")) else (lambda x: x)
        if f == "_id":
            return False
        have = {norm(v) for v in _values(src, f)}
        return any(norm(w) in have for w in wanted)

    def _aggs(self, aggs: dict, matched: list[tuple[str, dict]], mappings: dict, corpus: list) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, spec in aggs.items():
            sub = spec.get("aggs") or spec.get("aggregations")
            kind = next(k for k in spec if k not in ("aggs", "aggregations"))
            body = spec[kind]
            if kind == "filters":
                buckets = {}
                for key, q in body["filters"].items():
                    in_bucket = [(i, s) for i, s in matched if self._eval(q, s, mappings[i], corpus)[0]]
                    b: dict[str, Any] = {"doc_count": len(in_bucket)}
                    if sub:
                        b.update(self._aggs(sub, in_bucket, mappings, corpus))
                    buckets[key] = b
                out[name] = {"buckets": buckets}
            elif kind == "filter":
                in_bucket = [(i, s) for i, s in matched if self._eval(body, s, mappings[i], corpus)[0]]
                b = {"doc_count": len(in_bucket)}
                if sub:
                    b.update(self._aggs(sub, in_bucket, mappings, corpus))
                out[name] = b
            elif kind == "cardinality":
                out[name] = {"value": len({v for _i, s in matched for v in _values(s, body["field"])})}
            elif kind == "max":
                if body.get("script") in ("_score", {"source": "_score"}, {"source": "_score", "lang": "painless"}):
                    vals = [self._scores.get(id(s), 0.0) for _i, s in matched]
                    out[name] = {"value": max(vals) if vals else None}
                    continue
                # a date field: epoch milliseconds as a double, and value_as_string in the
                # field's default format (search-aggregations-metrics-max-aggregation)
                is_date = any(_field_spec(mappings[i]["properties"], body["field"]).get("type") == "date"
                              for i, _s in matched)
                vals = [float(_date_ms(v)) if is_date else _as_num(v, False)
                        for _i, s in matched for v in _values(s, body["field"])]
                out[name] = {"value": max(vals) if vals else None}
                if is_date and vals:
                    out[name]["value_as_string"] = (_EPOCH + timedelta(milliseconds=max(vals))).strftime(
                        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            elif kind == "composite":
                # one terms source, keys ascending, paged by ``after`` (search-aggregations-bucket-composite)
                [source] = body["sources"]
                [(src_name, src_spec)] = source.items()
                field_name = src_spec["terms"]["field"]
                groups: dict[Any, list] = {}
                for i, s in matched:
                    for v in set(_values(s, field_name)):
                        groups.setdefault(v, []).append((i, s))
                keys = sorted(groups)
                if body.get("after"):
                    keys = [k for k in keys if k > body["after"][src_name]]
                size = body.get("size", 10)
                page_keys = keys[:size]
                buckets = []
                for k in page_keys:
                    b = {"key": {src_name: k}, "doc_count": len(groups[k])}
                    if sub:
                        b.update(self._aggs(sub, groups[k], mappings, corpus))
                    buckets.append(b)
                out[name] = {"buckets": buckets}
                if page_keys:
                    out[name]["after_key"] = {src_name: page_keys[-1]}
            elif kind == "date_range":
                # from inclusive, to exclusive; bounds as ``format`` epoch_millis strings; buckets in the
                # ranges' order, each with its ``key`` (search-aggregations-bucket-daterange-aggregation)
                assert body.get("format") == "epoch_millis", "fake ES: date_range bounds in epoch_millis only"
                buckets_out = []
                for r in body["ranges"]:
                    lo = float(r["from"]) / 1000 if "from" in r else float("-inf")
                    hi = float(r["to"]) / 1000 if "to" in r else float("inf")
                    in_bucket = [(i, s) for i, s in matched
                                 if any(lo <= _as_num(v, True) < hi for v in _values(s, body["field"]))]
                    b = {"key": r.get("key", f"{r.get('from', '*')}-{r.get('to', '*')}"), "doc_count": len(in_bucket)}
                    if "from" in r:
                        b["from"] = float(r["from"])
                    if "to" in r:
                        b["to"] = float(r["to"])
                    if sub:
                        b.update(self._aggs(sub, in_bucket, mappings, corpus))
                    buckets_out.append(b)
                out[name] = {"buckets": buckets_out}
            elif kind == "sum":
                out[name] = {"value": float(sum(_as_num(v, False) for _i, s in matched for v in _values(s, body["field"])))}
            elif kind == "terms":
                counts: dict[Any, int] = {}
                for _i, s in matched:
                    for v in set(_values(s, body["field"])):
                        counts[v] = counts.get(v, 0) + 1
                order = body.get("order", {"_count": "desc"})
                if "_key" in order:
                    keys = sorted(counts, reverse=order["_key"] == "desc")
                else:
                    keys = sorted(counts, key=lambda k: (-counts[k], k))
                size = body.get("size", 10)
                out[name] = {"doc_count_error_upper_bound": 0,
                             "sum_other_doc_count": sum(counts[k] for k in keys[size:]),
                             "buckets": [{"key": k, "doc_count": counts[k]} for k in keys[:size]]}
            elif kind == "top_hits":
                hits = [{"_index": i, "_id": "", "_score": None, "_source": s} for i, s in matched]
                sort = body.get("sort") or []
                hits.sort(key=lambda h: _sort_key(h, sort))
                hits = hits[: body.get("size", 3)]
                for h in hits:
                    h["sort"] = [_sort_value(h, x) for x in sort]
                    h["_source"] = _filter_source(h["_source"], body.get("_source", True))
                out[name] = {"hits": {"total": {"value": len(matched), "relation": "eq"}, "max_score": None, "hits": hits}}
            else:
                raise AssertionError(f"fake ES: aggregation {kind!r} not implemented")
        return out


MAX_RESULT_WINDOW = 10_000  # index.max_result_window's default
MAX_TERMS_COUNT = 65_536  # index.max_terms_count's default


_TIME_VALUE = re.compile(r"-1|0|\d+(nanos|micros|ms|s|m|h|d)")


def _search_phase_error(kind: str, reason: str) -> dict[str, Any]:
    """A shard-level refusal as the search API reports it: 400, all shards failed."""
    cause = {"type": kind, "reason": reason}
    return {"error": {"root_cause": [cause], "type": "search_phase_execution_exception", "reason": "all shards failed",
                      "phase": "query", "grouped": True,
                      "failed_shards": [{"shard": 0, "index": "fake", "node": "fake-node-0", "reason": cause}],
                      "caused_by": cause}, "status": 400}


class _Err(Exception):
    def __init__(self, status: int, body: Any):
        self.status, self.body = status, body


# -- the one stored script, emulated ---------------------------------------------
def _cluster_upsert(src: dict, params: dict) -> str:
    """Python twin of streams.es_templates.CLUSTER_UPSERT_SCRIPT (stored as ``T.SCRIPT_ID``)."""
    d = params["doc"]
    sightings = params.get("sightings")
    if not isinstance(sightings, list) or not all(isinstance(s, dict) and isinstance(s.get("hashtags"), list)
                                                  for s in sightings):
        # painless: ``params.sightings.isEmpty()`` or ``for (def h : s.hashtags)`` on a null, or a
        # loop over what is no list (the params of the script before, ``sighting``, among them)
        raise _Err(400, {"type": "script_exception", "reason": "runtime error",
                         "caused_by": {"type": "null_pointer_exception" if sightings is None else "class_cast_exception",
                                       "reason": f"params.sightings: {type(sightings).__name__}"}})
    newer = src.get("revision") is None or d["revision"] > src["revision"]
    if newer:
        src.update(json.loads(json.dumps(d)))
    elif not sightings:
        return "noop"
    caps = params["caps"]

    def add(field: str, value: Any, cap: int) -> None:
        if value in (None, ""):
            return
        if src.get(field) is None:
            src[field] = []
        lst = src[field]
        if value not in lst and len(lst) < cap:
            lst.append(value)

    for s in sightings:
        add("sample_texts", s.get("text"), caps["texts"])
        for h in s["hashtags"]:
            add("hashtags", h, caps["hashtags"])
        add("languages", s.get("lang"), caps["languages"])
        add("accounts_sample", s.get("account"), caps["accounts"])
        add("post_urls", s.get("post_url"), caps["post_urls"])
    return "updated"


def _delivery_guard(src: dict, params: dict) -> str:
    """Python twin of streams.es_store_deliveries.DELIVERY_SCRIPT: delivered stays
    delivered (a document from before mapping v4: its status text says so)."""
    if src.get("state") == "delivered" or (src.get("state") is None and src.get("status") == "delivered"):
        return "noop"
    src["state"], src["status"], src["at"] = params["state"], params["detail"], params["at"]
    return "updated"


def _inline_scripts() -> dict[str, Callable[[dict, dict], str]]:
    from streams.es_store_deliveries import DELIVERY_SCRIPT

    return {DELIVERY_SCRIPT: _delivery_guard}


_INLINE_SCRIPTS = _inline_scripts()


# -- field helpers ----------------------------------------------------------------
def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else ([] if v is None else [v])


def _values(src: dict, path: str) -> list:
    """Leaf values at a dotted path, arrays flattened; a multi-field
    (``hashtags.text``) reads its parent's values."""
    cur: list = [src]
    for part in path.split("."):
        nxt: list = []
        for c in cur:
            if isinstance(c, dict) and part in c:
                nxt.extend(_as_list(c[part]))
        if not nxt and cur and all(not isinstance(c, dict) for c in cur):
            return [c for c in cur if c is not None]  # multi-field: the parent's values
        cur = nxt
    return [c for c in cur if c is not None]


def _flag(params: dict, name: str) -> bool:
    v = params.get(name)
    return v is not None and v[-1] in ("", "true")


def _flat_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as the server keeps them: flat keys, each under ``index.``
    (``{"analysis": {...}}`` and ``{"index.analysis....": ...}`` alike)."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            key = prefix + k
            if isinstance(v, dict):
                walk(v, key + ".")
            else:
                out[key if key.startswith("index.") else "index." + key] = v

    walk(settings, "")
    return out


def _nested_analysis(flat: dict[str, Any]) -> dict[str, Any]:
    """``index.analysis.*`` of flat settings as one object (``analyzer``, ``char_filter``, ``normalizer``...)."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        if key.startswith("index.analysis."):
            *path, leaf = key[len("index.analysis."):].split(".")
            node = out
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = v
    return out


def _analysis_refusal(props: dict[str, Any], analysis: dict[str, Any], prefix: str = "") -> _Err | None:
    """What the server answers to mappings that name an analyzer or a
    normalizer the settings they are parsed with do not define (TextParams:
    "analyzer [x] has not been configured in mappings"; KeywordFieldMapper:
    "normalizer [x] not found for field [y]"), else None."""
    def refuse(reason: str, cause: str) -> _Err:
        top = {"type": "mapper_parsing_exception", "reason": f"Failed to parse mapping: {reason}"}
        return _Err(400, {"error": {"root_cause": [top], **top, "caused_by": {"type": cause, "reason": reason}},
                          "status": 400})

    for k, spec in props.items():
        if not isinstance(spec, dict):
            continue
        kind = spec.get("type", "object")
        if kind == "text":
            for param in ("analyzer", "search_analyzer", "search_quote_analyzer"):
                name = spec.get(param)
                if name is not None and name not in BUILTIN_ANALYZERS and name not in (analysis.get("analyzer") or {}):
                    return refuse(f"analyzer [{name}] has not been configured in mappings", "illegal_argument_exception")
        if kind == "keyword":
            name = spec.get("normalizer")
            if name is not None and name not in BUILTIN_NORMALIZERS and name not in (analysis.get("normalizer") or {}):
                return refuse(f"normalizer [{name}] not found for field [{k}]", "mapper_parsing_exception")
        for sub in ("properties", "fields"):
            if isinstance(spec.get(sub), dict):
                found = _analysis_refusal(spec[sub], analysis, f"{prefix}{k}.")
                if found is not None:
                    return found
    return None


# Mapping parameters an existing field keeps (mapping-params: "can not be updated on
# existing fields using the update mapping API"), with the value a field that does
# not set it has; ``search_analyzer``, ``search_quote_analyzer`` and ``ignore_above``
# can be updated, and a multi-field added.
_FIXED_PARAMS = (("analyzer", "default"), ("normalizer", "null"))
_UPDATABLE_PARAMS = ("search_analyzer", "search_quote_analyzer", "ignore_above")


def _merge_mapping(have: dict, added: dict, prefix: str, apply: bool = False) -> None:
    """``added`` properties into ``have`` as PUT _mapping merges them: new
    fields (and multi-fields) added, objects merged, a field's type, analyzer
    or normalizer never changed (400 illegal_argument_exception, as the
    server refuses it)."""
    for k, spec in added.items():
        old = have.get(k)
        if old is None:
            if apply:
                have[k] = json.loads(json.dumps(spec))
            continue
        a, b = old.get("type", "object"), spec.get("type", "object")
        if a != b:
            raise _Err(400, error_body("illegal_argument_exception",
                                       f"mapper [{prefix}{k}] cannot be changed from type [{a}] to [{b}]", 400))
        if b not in ("object", "nested"):
            for param, unset in _FIXED_PARAMS:
                was, wanted = old.get(param, unset), spec.get(param, unset)
                if was != wanted:
                    raise _Err(400, error_body("illegal_argument_exception",
                                               f"Mapper for [{prefix}{k}] conflicts with existing mapper:\n\tCannot update "
                                               f"parameter [{param}] from [{was}] to [{wanted}]", 400))
            if apply:
                old.update({p: spec[p] for p in _UPDATABLE_PARAMS if p in spec})
        for sub in ("properties", "fields"):
            if sub in spec:
                _merge_mapping(old.setdefault(sub, {}) if apply else old.get(sub, {}), spec[sub], f"{prefix}{k}.", apply)


def _field_spec(props: dict, path: str) -> dict:
    spec: dict = {"properties": props}
    for part in path.split("."):
        nxt = (spec.get("properties") or {}).get(part) or (spec.get("fields") or {}).get(part)
        if nxt is None:
            return {}
        spec = nxt
    return spec


def _date_ms(v: Any) -> int:
    """A date as ES keeps a ``date`` field: whole milliseconds since the epoch
    (finer digits dropped), a date without an offset read as UTC."""
    d = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return (d - _EPOCH) // timedelta(milliseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _as_num(v: Any, is_date: bool) -> float:
    if is_date:
        return _date_ms(v) / 1000
    return float(v)


def _wildcard_match(pattern: str, value: str, fold: bool) -> bool:
    """The wildcard query's pattern (``*`` any run, ``?`` one character,
    a backslash escapes the next) against a whole keyword value."""
    rx, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            rx.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        rx.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
        i += 1
    return re.fullmatch("".join(rx), value, re.DOTALL | (re.IGNORECASE if fold else 0)) is not None


def _range_ok(x: float, op: str, b: float) -> bool:
    return {"gt": x > b, "gte": x >= b, "lt": x < b, "lte": x <= b}[op]


def _phrase_count(toks: list[str], phrase: list[str]) -> int:
    n = len(phrase)
    return sum(1 for i in range(len(toks) - n + 1) if toks[i:i + n] == phrase) if n else 0


def _orders(sort: list) -> list[str]:
    out = []
    for s in sort:
        if isinstance(s, str):
            out.append("desc" if s == "_score" else "asc")
        else:
            f, o = next(iter(s.items()))
            out.append(o if isinstance(o, str) else o.get("order", "asc"))
    return out


def _sort_value(h: dict, s: Any) -> Any:
    if s == "_score" or (isinstance(s, dict) and "_score" in s):
        return h["_score"]
    f = s if isinstance(s, str) else next(iter(s))
    vals = _values(h["_source"], f)
    if not vals:
        return None
    v = vals[0]
    if f in ("@timestamp", "first_seen", "last_seen", "created_at", "updated_at", "at"):
        try:
            return _date_ms(v)
        except ValueError:
            return v
    return v


def _cmp_key(v: Any, order: str) -> tuple:
    if v is None:  # missing values sort last either way
        return (1, 0)
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, (int, float)):
        return (0, -v if order == "desc" else v)
    if order == "desc":
        return (0, tuple(-ord(c) for c in str(v)) + (1,))
    return (0, tuple(ord(c) for c in str(v)) + (0,))


def _sort_key(h: dict, sort: list) -> tuple:
    return tuple(_cmp_key(_sort_value(h, s), o) for s, o in zip(sort, _orders(sort)))


def _filter_source(src: dict, spec: Any) -> Any:
    if spec is True or spec is None:
        return src
    if spec is False:
        return None
    includes = spec if isinstance(spec, list) else spec.get("includes") or []
    excludes = [] if isinstance(spec, list) else spec.get("excludes") or []
    out = _pick(src, includes) if includes else json.loads(json.dumps(src))
    for ex in excludes:
        _drop(out, ex.split("."))
    return out


def _pick(obj: Any, paths: list[str]) -> Any:
    if isinstance(obj, list):
        return [_pick(o, paths) for o in obj]
    if not isinstance(obj, dict):
        return obj
    out: dict[str, Any] = {}
    for p in paths:
        head, _, rest = p.partition(".")
        if head not in obj:
            continue
        if not rest:
            out[head] = obj[head]
        else:
            sub = _pick(obj[head], [rest])
            if isinstance(sub, list) and isinstance(out.get(head), list):
                out[head] = [{**a, **b} for a, b in zip(out[head], sub)]
            elif isinstance(sub, dict) and isinstance(out.get(head), dict):
                out[head].update(sub)
            else:
                out[head] = sub
    return out


def _drop(obj: Any, parts: list[str]) -> None:
    if isinstance(obj, list):
        for o in obj:
            _drop(o, parts)
        return
    if not isinstance(obj, dict) or parts[0] not in obj:
        return
    if len(parts) == 1:
        del obj[parts[0]]
    else:
        _drop(obj[parts[0]], parts[1:])


def _knn_score(src: dict, field: str, query_hex: str) -> float | None:
    """Best (bits - hamming) / bits over the field's vectors (nested included)."""
    best = None
    q = int(query_hex, 16)
    bits = len(query_hex) * 4
    for v in _values(src, field):
        if not isinstance(v, str) or len(v) != len(query_hex):
            continue
        s = (bits - bin(int(v, 16) ^ q).count("1")) / bits
        best = s if best is None else max(best, s)
    return best
