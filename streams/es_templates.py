"""Elasticsearch index templates, component templates, ILM policy and the
cluster upsert script, versioned.

Readers and writers only ever name the aliases (``deepwatch-clusters``,
``deepwatch-alerts``, ...); each points at a concrete ``<alias>-v<N>`` index.
A mapping change bumps ``MAPPING_VERSION``: a new ``-v<N+1>`` index is
created from the new template, the old one is reindexed into it and the
alias swapped (``docs/elasticsearch.md``), so readers never see an outage;
a change that only adds fields is put in place instead (``MIGRATIONS``).
Sightings are a data stream (append-only, time-ordered, rolled over and
expired by ILM): its next backing index is made from the new template
(``ROLLOVER``); everything else is keyed by stable ids.
"""

from __future__ import annotations

import hashlib
from typing import Any

# bump with any mapping change (and reindex, see module docstring); 2: run on
# source refs and markers; 3: velocity counts are long (an hour's engagement
# past 2**31 was refused as an integer, and the cluster's snapshots with it);
# 4: alerts gain ``first_seen``/``last_seen``, ``platforms``, ``sample_posts``
# and ``account_id``, deliveries ``state`` (added fields only: ``PUT
# <alias>/_mapping`` in place works); 5: the sightings' ``text`` and
# ``hashtags.text`` use the ``deepwatch_text`` analyzer (words break where
# SQLite's FTS5 ``unicode61`` breaks them: ``Trump's`` is ``trump`` and ``s``)
# and every component template carries the analysis its mappings name (a
# data stream: a rollover, ``ROLLOVER``); 6: ``velocity.accounts_5m`` on clusters
# and alerts (an added field: in place; the clusters mapping is strict, so a v5
# index refused every snapshot carrying it)
MAPPING_VERSION = 6

PDQ_BITS = 256
PHASH_BITS = 64

# Bounded, de-duplicated samples kept on the cluster document (the exact
# per-sighting data lives in the sightings data stream).
CAPS = {"texts": 20, "hashtags": 100, "languages": 20, "accounts": 50, "post_urls": 20}


def names(prefix: str = "deepwatch") -> dict[str, str]:
    return {
        "clusters": f"{prefix}-clusters",
        "sightings": f"{prefix}-sightings",
        "alerts": f"{prefix}-alerts",
        "dead_letters": f"{prefix}-dead-letters",
        "deliveries": f"{prefix}-deliveries",
        "processed": f"{prefix}-processed",
    }


def concrete(alias: str) -> str:
    return f"{alias}-v{MAPPING_VERSION}"


# Characters that join the letters or digits either side of them into one
# word for the ``standard`` tokenizer (Unicode word boundaries, UAX #29: the
# Word_Break values Single_Quote, MidNumLet, MidLetter, MidNum, ExtendNumLet,
# Double_Quote between Hebrew letters, and the Format/ZWJ characters rule WB4
# ignores), where SQLite's ``unicode61`` tokenizer (punctuation, spaces and
# symbols separate; letters and digits do not) and the query's words
# (``streams.cluster_search.text_terms``) break the word. ``deepwatch_text``
# replaces each with a space before tokenizing, so ``Trump's``, ``u.s.``,
# ``1,000``, ``a:b`` and ``foo_bar`` are two words on both stores.
WORD_JOINERS: dict[str, list[int]] = {
    "Single_Quote": [0x0027],
    "MidNumLet": [0x002E, 0x2018, 0x2019, 0x2024, 0xFE52, 0xFF07, 0xFF0E],
    "MidLetter": [0x003A, 0x00B7, 0x0387, 0x055F, 0x05F4, 0x2027, 0xFE13, 0xFE55, 0xFF1A],
    "MidNum": [0x002C, 0x003B, 0x037E, 0x0589, 0x060C, 0x060D, 0x066C, 0x07F8, 0x2044, 0xFE10, 0xFE14, 0xFE50,
               0xFE54, 0xFF0C, 0xFF1B],
    "ExtendNumLet": [0x005F, 0x202F, 0x203F, 0x2040, 0x2054, 0xFE33, 0xFE34, 0xFE4D, 0xFE4E, 0xFE4F, 0xFF3F],
    "Double_Quote": [0x0022],
    "Format": [0x00AD, 0x200C, 0x200D, 0x2060],
}

# The index analysis every deepwatch index gets: the ``deepwatch_lowercase``
# normalizer (keywords compared case-insensitively) and, from mapping v5, the
# ``deepwatch_text`` analyzer of the sightings' full text: a ``mapping``
# character filter turning the word joiners above into spaces (``\uXXXX``
# escapes, which the filter's rules take; a bare space would be trimmed),
# the ``standard`` tokenizer (each CJK ideograph a token, so a phrase of them
# is found inside a longer run) and ``lowercase``. Carried by *every*
# component template, the ``-mappings`` ones too: Elasticsearch validates a
# component template on its own (its mappings against its own settings), so
# an analyzer or normalizer defined only in ``deepwatch-common`` is refused
# where a mapping names it ("analyzer [...] has not been configured in
# mappings", "normalizer [...] not found for field [...]"); before v5 only
# ``deepwatch-common`` carried the normalizer.
ANALYSIS: dict[str, Any] = {
    "normalizer": {"deepwatch_lowercase": {"type": "custom", "filter": ["lowercase"]}},
    "char_filter": {"deepwatch_word_breaks": {
        "type": "mapping",
        "mappings": [f"\\u{cp:04X} => \\u0020" for cps in WORD_JOINERS.values() for cp in cps],
    }},
    "analyzer": {"deepwatch_text": {"type": "custom", "char_filter": ["deepwatch_word_breaks"], "tokenizer": "standard",
                                    "filter": ["lowercase"]}},
}

_KEYWORD = {"type": "keyword", "ignore_above": 1024}
_TEXT_WITH_KEYWORD = {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 1024}}}
_LOWER_KEYWORD = {"type": "keyword", "normalizer": "deepwatch_lowercase", "ignore_above": 256}
# full text searched by ``deepwatch search`` (mapping v5; v4: the ``standard`` analyzer)
_WORDS = {"type": "text", "analyzer": "deepwatch_text"}

# Mapping v4's additions to alerts: where and when the picture was seen, the
# posts a subscriber can open and an account alert's account
# (``streams.records.Alert``). Also what a v3
# deployment puts in place (``PUT deepwatch-alerts/_mapping``,
# docs/elasticsearch.md) instead of reindexing.
ALERT_SPREAD: dict[str, Any] = {
    "first_seen": {"type": "date"}, "last_seen": {"type": "date"},
    "platforms": _KEYWORD, "account_id": _KEYWORD,
    "sample_posts": {"properties": {
        "event_id": _KEYWORD, "platform": _KEYWORD, "account_id": _KEYWORD, "account_handle": _LOWER_KEYWORD,
        "post_url": {"type": "keyword", "index": False}, "posted_at": {"type": "date"},
    }},
}

# Mapping v4's addition to deliveries: the delivery's state
# (``streams.findings.DeliveryState``), which every query reads; ``status``
# keeps only why. Also what a v3 deployment puts in place (``PUT
# deepwatch-deliveries/_mapping``, docs/elasticsearch.md) before v4 workers
# write: the deliveries mapping is strict.
DELIVERY_STATE: dict[str, Any] = {"state": _KEYWORD}

_VELOCITY_FIELDS = ("sightings_5m", "sightings_1h", "accounts_1h", "engagement_1h", "accounts_5m")
_VELOCITY = {"properties": {k: {"type": "long"} for k in _VELOCITY_FIELDS}}
# Mapping v6's addition to clusters and alerts (``streams.records.Velocity.accounts_5m``), merged by ``PUT
# <alias>/_mapping`` into the velocity object v5 made
VELOCITY_ACCOUNTS_5M: dict[str, Any] = {"velocity": {"properties": {"accounts_5m": {"type": "long"}}}}

# What each mapping version changed, per index (a ``names`` key): the fields it
# added, which an index of the version before takes in place (``PUT
# <alias>/_mapping``: ``ensure_setup`` does it), or ``REINDEX`` where a field's
# type changed, which no index takes in place (a new ``<alias>-v<N>`` index and
# a reindex, docs/elasticsearch.md), or, for the sightings data stream,
# ``ROLLOVER`` where a field's analysis changed: no backing index takes that
# in place either (a text field's ``analyzer`` cannot be updated, and the
# analysis settings are static on an open index), but the stream's next
# backing index is made from the new template. An index not named did not
# change in that version. ``ensure_setup`` reads the version of each index
# behind an alias (its mapping's ``_meta.mapping_version``, else the
# ``-v<N>`` of its name) and refuses to start while a ``REINDEX`` step is
# outstanding; for a ``ROLLOVER`` step it asks for the stream's rollover on
# its next write (a lazy rollover), and the backing indices written before
# keep their analysis until ILM deletes them.
REINDEX = None
ROLLOVER = "rollover"
MIGRATIONS: dict[int, dict[str, dict[str, Any] | str | None]] = {
    2: {"processed": {"run": _KEYWORD}, "dead_letters": {"source": {"properties": {"run": _KEYWORD}}},
        "sightings": {"source": {"properties": {"run": _KEYWORD}}}},
    3: {"clusters": REINDEX, "alerts": REINDEX},  # velocity counts integer -> long
    4: {"alerts": ALERT_SPREAD, "deliveries": DELIVERY_STATE},
    5: {"sightings": ROLLOVER},  # text, hashtags.text: standard -> deepwatch_text
    6: {"clusters": VELOCITY_ACCOUNTS_5M, "alerts": VELOCITY_ACCOUNTS_5M},
}


def mapping_meta(version: int = MAPPING_VERSION) -> dict[str, Any]:
    """The ``_meta`` of every index's mapping: which version made it (or brought it up to date)."""
    return {"managed_by": "deepwatch", "mapping_version": version}


_EVIDENCE = {
    "type": "nested",
    "properties": {
        "detector": _KEYWORD, "kind": _KEYWORD, "score": {"type": "float"}, "weight": {"type": "float"},
        "detail": _TEXT_WITH_KEYWORD, "sha256": _KEYWORD,
        "data": {"type": "object", "enabled": False},  # detector-specific, shown not searched
    },
}
_ENGAGEMENT = {"properties": {k: {"type": "long"} for k in ("likes", "reposts", "replies", "views")}}
_SOURCE_REF = {"properties": {"topic": _KEYWORD, "partition": {"type": "integer"}, "offset": {"type": "long"},
                               "run": _KEYWORD}}


def _bits(dims: int) -> dict[str, Any]:
    # element_type bit (ES >= 8.15): Hamming distance; l2_norm is the only
    # similarity bit vectors take and ranks by Hamming.
    return {"type": "dense_vector", "element_type": "bit", "dims": dims, "index": True, "similarity": "l2_norm"}


def component_templates(prefix: str = "deepwatch") -> dict[str, dict[str, Any]]:
    v = MAPPING_VERSION
    meta = {"managed_by": "deepwatch", "mapping_version": v}
    settings = {"analysis": ANALYSIS}  # in every component template: see ANALYSIS
    common = {"template": {"settings": settings}, "version": v, "_meta": meta}
    clusters = {
        "template": {
            "settings": settings,
            "mappings": {
                "_meta": mapping_meta(),
                "dynamic": "strict",
                "properties": {
                    "schema_version": {"type": "integer"},
                    "cluster_id": _KEYWORD,
                    "revision": {"type": "long"},
                    "fake_score": {"type": "float"},
                    "verdict": _KEYWORD,
                    "evidence": _EVIDENCE,
                    "evidence_summary": _TEXT_WITH_KEYWORD,
                    "detector_scores": {"type": "object", "dynamic": True},  # detector -> its score (numbers)
                    "velocity": _VELOCITY,
                    "engagement": _ENGAGEMENT,
                    "stream_sightings": {"type": "integer"},
                    "stream_accounts": {"type": "integer"},
                    "platforms": _KEYWORD,
                    "first_seen": {"type": "date"},
                    "last_seen": {"type": "date"},
                    "merged_into": _KEYWORD,
                    "merged_from": _KEYWORD,
                    "models_pending": {"type": "boolean"},
                    "suppressed": _KEYWORD,
                    "alert_level": {"type": "integer"},
                    "updated_at": {"type": "date"},
                    "blob_refs": _KEYWORD,  # sha256 keys of the member images in the blob store
                    "picture_url": _KEYWORD,  # where the desk shows the picture
                    "sample_texts": _TEXT_WITH_KEYWORD,
                    "hashtags": {**_LOWER_KEYWORD, "fields": {"text": {"type": "text"}}},
                    "languages": _KEYWORD,
                    "accounts_sample": _KEYWORD,
                    "post_urls": {"type": "keyword", "index": False},
                    "members": {
                        "type": "nested",
                        "properties": {
                            "sha256": _KEYWORD, "phash": _KEYWORD, "pdq": _KEYWORD, "pdq_quality": {"type": "integer"},
                            "event_id": _KEYWORD, "width": {"type": "integer"}, "height": {"type": "integer"},
                            "format": _KEYWORD, "distance": {"type": "integer"}, "representative": {"type": "boolean"},
                            "views": _KEYWORD, "trimmed": {"type": "boolean"},
                            "pdq_bits": _bits(PDQ_BITS), "phash_bits": _bits(PHASH_BITS),
                        },
                    },
                },
            },
        },
        "version": v, "_meta": meta,
    }
    sightings = {
        "template": {
            "settings": settings,
            "mappings": {
                "_meta": mapping_meta(),
                "dynamic": "strict",
                "properties": {
                    "@timestamp": {"type": "date"},  # posted_at: the data stream's time axis
                    "posted_at": {"type": "keyword", "index": False},  # as the event gave it
                    "schema_version": {"type": "integer"},
                    "event_id": _KEYWORD, "cluster_id": _KEYWORD, "sha256": _KEYWORD,
                    "platform": _KEYWORD, "account_id": _KEYWORD, "account_handle": _KEYWORD,
                    "account_handle_norm": _LOWER_KEYWORD,
                    "post_url": {"type": "keyword", "index": False},
                    "text": _WORDS,
                    "hashtags": {**_LOWER_KEYWORD, "fields": {"text": _WORDS}},
                    "lang": _KEYWORD,
                    "engagement": _ENGAGEMENT,
                    "source": _SOURCE_REF,
                },
            },
        },
        "version": v, "_meta": meta,
    }
    alerts = {
        "template": {
            "settings": settings,
            "mappings": {
                "_meta": mapping_meta(),
                "dynamic": False,  # the alert record is kept whole in _source; these fields are searchable
                "properties": {
                    "alert_id": _KEYWORD, "cluster_id": _KEYWORD, "rule": _KEYWORD, "level": {"type": "integer"},
                    "fake_score": {"type": "float"}, "verdict": _KEYWORD, "velocity": _VELOCITY,
                    "sightings": {"type": "integer"}, "accounts": {"type": "integer"},
                    "evidence": {"type": "object", "enabled": False}, "evidence_summary": _TEXT_WITH_KEYWORD,
                    "at": {"type": "date"}, "created_at": {"type": "date"}, "@timestamp": {"type": "date"},
                    "trigger_event_id": _KEYWORD, "trigger_ingested_at": {"type": "date"},
                    **ALERT_SPREAD,
                },
            },
        },
        "version": v, "_meta": meta,
    }
    dead_letters = {
        "template": {
            "settings": settings,
            "mappings": {
                "_meta": mapping_meta(),
                "dynamic": "strict",
                "properties": {
                    "schema_version": {"type": "integer"}, "dl_key": _KEYWORD, "event_id": _KEYWORD,
                    "stage": _KEYWORD, "reason": _KEYWORD, "detail": _TEXT_WITH_KEYWORD,
                    "source": _SOURCE_REF, "payload_excerpt": {"type": "text", "index": False},
                    "at": {"type": "keyword", "index": False}, "@timestamp": {"type": "date"},
                },
            },
        },
        "version": v, "_meta": meta,
    }
    deliveries = {
        "template": {
            "settings": settings,
            "mappings": {
                "_meta": mapping_meta(),
                "dynamic": "strict",
                "properties": {"alert_id": _KEYWORD, "target": _KEYWORD, "status": _KEYWORD, "at": {"type": "date"},
                               **DELIVERY_STATE},
            },
        },
        "version": v, "_meta": meta,
    }
    processed = {
        "template": {
            "settings": settings,
            "mappings": {
                "_meta": mapping_meta(),
                "dynamic": "strict",
                "properties": {"topic": _KEYWORD, "partition": {"type": "integer"}, "offset": {"type": "long"},
                               "run": _KEYWORD,  # the producing run: replay accounting per run
                               "outcome": _KEYWORD, "event_id": _KEYWORD, "@timestamp": {"type": "date"}},
            },
        },
        "version": v, "_meta": meta,
    }
    return {
        f"{prefix}-common": common,
        f"{prefix}-processed-mappings": processed,
        f"{prefix}-clusters-mappings": clusters,
        f"{prefix}-sightings-mappings": sightings,
        f"{prefix}-alerts-mappings": alerts,
        f"{prefix}-dead-letters-mappings": dead_letters,
        f"{prefix}-deliveries-mappings": deliveries,
    }


def ilm_policy(hot_days: int = 7, delete_days: int = 365) -> dict[str, Any]:
    """Sightings roll over daily (or at 50 GB a primary) and are deleted
    after ``delete_days``; clusters, alerts and dead letters are kept."""
    return {
        "policy": {
            "phases": {
                "hot": {"actions": {"rollover": {"max_age": "1d", "max_primary_shard_size": "50gb"}}},
                "warm": {"min_age": f"{hot_days}d", "actions": {"forcemerge": {"max_num_segments": 1}}},
                "delete": {"min_age": f"{delete_days}d", "actions": {"delete": {}}},
            },
            "_meta": {"managed_by": "deepwatch"},
        }
    }


def index_templates(prefix: str = "deepwatch") -> dict[str, dict[str, Any]]:
    n = names(prefix)
    v = MAPPING_VERSION
    meta = {"managed_by": "deepwatch", "mapping_version": v}
    out: dict[str, dict[str, Any]] = {}
    for key in ("clusters", "alerts", "dead_letters", "deliveries", "processed"):
        alias = n[key]
        out[alias] = {
            # versioned concrete indices only: the alias itself must never match
            "index_patterns": [f"{alias}-v*"],
            "composed_of": [f"{prefix}-common", f"{alias}-mappings"],
            "template": {"settings": {"number_of_shards": 1}},
            "priority": 200, "version": v, "_meta": meta,
        }
    out[n["sightings"]] = {
        "index_patterns": [f"{n['sightings']}*"],
        "data_stream": {},
        "composed_of": [f"{prefix}-common", f"{n['sightings']}-mappings"],
        "template": {"settings": {"index.lifecycle.name": n["sightings"]}},
        "priority": 200, "version": v, "_meta": meta,
    }
    return out


# The revision guard and the bounded samples, in one stored script so every
# writer (and Kibana) runs the same code. One update per cluster and sink
# batch: ``params.doc`` is the batch's newest revision of the cluster,
# ``params.sightings`` its sightings in batch order (``es_docs.batch_sightings``).
# A stale revision never overwrites a newer one; its sightings still add to the
# samples, which are capped sets, so redelivery changes nothing.
CLUSTER_UPSERT_SCRIPT = """
void addCapped(Map src, String field, def value, int cap) {
  if (value == null || value == '') { return; }
  if (src[field] == null) { src[field] = new ArrayList(); }
  List l = src[field];
  if (!l.contains(value) && l.size() < cap) { l.add(value); }
}
def d = params.doc;
boolean newer = ctx._source.revision == null || d.revision > ctx._source.revision;
if (newer) {
  for (def e : d.entrySet()) { ctx._source[e.getKey()] = e.getValue(); }
} else if (params.sightings.isEmpty()) {
  ctx.op = 'noop';
  return;
}
for (def s : params.sightings) {
  addCapped(ctx._source, 'sample_texts', s.text, params.caps.texts);
  for (def h : s.hashtags) { addCapped(ctx._source, 'hashtags', h, params.caps.hashtags); }
  addCapped(ctx._source, 'languages', s.lang, params.caps.languages);
  addCapped(ctx._source, 'accounts_sample', s.account, params.caps.accounts);
  addCapped(ctx._source, 'post_urls', s.post_url, params.caps.post_urls);
}
""".strip()

# The stored script's id names its source (a digest), not ``MAPPING_VERSION``
# (``deepwatch-cluster-upsert-v6`` and before): a changed script (its params
# changed: ``sighting`` became ``sightings``) is a new id, so ``ensure_setup``
# stores it beside the old one and never overwrites the script that workers of
# the version before still name during a rolling upgrade (their updates would
# fail on the params they send, and each of their starts would PUT the old
# source back). Old ids are left in place (docs/elasticsearch.md, "Writes").
# Tied to the mapping version, a script change without a mapping change kept
# its id; tied to the source, it cannot.
SCRIPT_ID = "deepwatch-cluster-upsert-" + hashlib.sha256(CLUSTER_UPSERT_SCRIPT.encode()).hexdigest()[:12]


def stored_script() -> dict[str, Any]:
    return {"script": {"lang": "painless", "source": CLUSTER_UPSERT_SCRIPT}}
