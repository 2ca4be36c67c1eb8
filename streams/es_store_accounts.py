"""The desk's account views over the Elasticsearch findings store's
sightings: every account ranked by its share of AI pictures, and accounts
active in a recent window (``FindingsStore.account_aggregates`` /
``account_windows``; SQLite's twin is ``streams.store_accounts``)."""

from __future__ import annotations

import heapq
import math
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Collection, Iterator

from streams import es_requests as R
from streams.findings import AccountAggregate, AccountCursor, AccountWindow, account_rank, read_limit

if TYPE_CHECKING:
    from streams.cluster_search import Deadline

# Accounts per composite page: with up to 100 platform buckets each, one page
# stays under search.max_buckets (65,536).
ACCOUNT_PAGE = 500
WINDOW_CHUNK = 200  # accounts per windowed-statistics request (a filters aggregation)
POSTS_PAGE = 10_000  # posts per search_after page when reading returned accounts' posts (max_result_window)
# exact below this many distinct values per bucket (the maximum); above it ES estimates within ~1%
CARDINALITY_PRECISION = 40_000


class EsAccountQueries:
    """Account reads of ``streams.es_store.EsFindingsStore``, which this is mixed into."""

    # Provided by ``EsFindingsStore``.
    names: dict[str, str]
    if TYPE_CHECKING:
        def _search(self, index: str, deadline: Deadline | None = None, **body: Any) -> dict[str, Any]: ...
        def _composite(self, index: str, query: dict[str, Any], field: str, aggs: dict[str, Any],
                       page: int, deadline: Deadline | None = None) -> Iterator[dict[str, Any]]: ...

    def account_aggregates(self, ai_cluster_ids: Collection[str], *, account_id: str | None = None,
                           min_posts: int = 0, min_ai_share: float = 0.0,
                           limit: int | None = None, after: AccountCursor | None = None) -> list[AccountAggregate]:
        """See ``FindingsStore.account_aggregates``: a composite aggregation
        over ``account_id`` (``ACCOUNT_PAGE`` accounts a request) counting
        each account's posts, pictures and AI pictures (``cardinality``:
        exact up to 40,000 distinct pictures an account, the most ES counts
        exactly; above that an estimate within about 1 %), platforms, and
        its first and last post and first handle (``top_hits``); the filter
        and the ranking are applied as pages arrive, keeping only the best
        ``limit`` (ranked after ``after``: its key, the first post's time in
        the epoch milliseconds the sort values carry). Then one
        ``search_after`` read of the returned accounts' posts (sort values
        and cluster id only) for their clusters and median gap."""
        limit = read_limit(limit)
        start = None if after is None else (-after.ai_share, -after.ai_pictures, -after.posts, after.first_ms(),
                                            after.first_event_id)
        in_order = [{"@timestamp": "asc"}, {"event_id": "asc"}]
        aggs = {
            "pictures": {"cardinality": {"field": "sha256", "precision_threshold": CARDINALITY_PRECISION}},
            "ai": {"filter": R.in_ids("cluster_id", ai_cluster_ids),
                   "aggs": {"pictures": {"cardinality": {"field": "sha256", "precision_threshold": CARDINALITY_PRECISION}}}},
            "platforms": R.PLATFORMS_AGG,
            "first": {"top_hits": {"size": 1, "sort": in_order, "_source": ["posted_at", "event_id"]}},
            "last": {"top_hits": {"size": 1, "sort": [{"@timestamp": "desc"}, {"event_id": "desc"}],
                                  "_source": ["posted_at"]}},
            # the first non-empty handle (an empty string is a value to ES, not to the desk)
            "handle": {"filter": {"bool": {"filter": [{"exists": {"field": "account_handle"}}],
                                           "must_not": [{"term": {"account_handle": ""}}]}},
                       "aggs": {"first": {"top_hits": {"size": 1, "sort": in_order, "_source": ["account_handle"]}}}},
        }
        query: dict[str, Any] = {"bool": {"filter": [] if account_id is None else [{"term": {"account_id": account_id}}]}}

        def ranked() -> Iterator[tuple[tuple, dict[str, Any]]]:
            for b in self._composite(self.names["sightings"], query, "account_id", aggs, ACCOUNT_PAGE):
                posts, pics, ai_pics = b["doc_count"], int(b["pictures"]["value"]), int(b["ai"]["pictures"]["value"])
                if posts < min_posts or (ai_pics / pics if pics else 0.0) < min_ai_share:
                    continue
                first = b["first"]["hits"]["hits"][0]
                share, n_ai, n = account_rank(ai_pics, pics, posts)
                key = (-share, -n_ai, -n, first["sort"][0], first["_source"]["event_id"])
                if start is not None and key <= start:
                    continue
                yield key, {
                    "account_id": b["key"]["key"], "posts": posts, "pictures": pics, "ai_pictures": ai_pics,
                    "first_seen": first["_source"]["posted_at"], "first_event_id": first["_source"]["event_id"],
                    "last_seen": b["last"]["hits"]["hits"][0]["_source"]["posted_at"],
                    "platforms": R.platforms_of(b["platforms"]["buckets"]),
                    "handle": next((h["_source"].get("account_handle")
                                    for h in b["handle"]["first"]["hits"]["hits"]), None)}

        rows = [row for _key, row in (heapq.nsmallest(limit, ranked(), key=lambda kr: kr[0]) if limit
                                      else sorted(ranked(), key=lambda kr: kr[0]))]
        details = self._account_posts([r["account_id"] for r in rows])
        return [AccountAggregate(**r, **details.get(r["account_id"], {"cluster_ids": [], "median_gap_s": None}))
                for r in rows]

    def _account_posts(self, accounts: list[str]) -> dict[str, dict[str, Any]]:
        """Per account: its distinct cluster ids and the median gap between
        consecutive posts, from one ``search_after`` read of these
        accounts' posts in account and posting order (sort values and the
        cluster id only); one account's gaps are held at a time."""
        out: dict[str, dict[str, Any]] = {}
        if not accounts:
            return out
        current: str | None = None
        clusters: set[str] = set()
        gaps: list[int] = []
        prev = 0

        def close() -> None:
            if current is not None:
                gaps.sort()
                out[current] = {"cluster_ids": sorted(clusters),
                                "median_gap_s": gaps[len(gaps) // 2] / 1000 if gaps else None}

        sort = [{"account_id": "asc"}, {"@timestamp": "asc"}, {"event_id": "asc"}]
        for i in range(0, len(accounts), R.ID_CHUNK):
            query = {"terms": {"account_id": sorted(accounts[i:i + R.ID_CHUNK])}}
            after = None
            while True:
                body: dict[str, Any] = {"query": query, "sort": sort, "size": POSTS_PAGE, "source": ["cluster_id"]}
                if after is not None:
                    body["search_after"] = after
                hits = self._search(self.names["sightings"], **body)["hits"]["hits"]
                for h in hits:
                    account, ms, _eid = h["sort"]
                    if account != current:
                        close()
                        current, clusters, gaps = account, set(), []
                    else:
                        gaps.append(int(ms) - prev)
                    prev = int(ms)
                    clusters.add(h["_source"]["cluster_id"])
                if len(hits) < POSTS_PAGE:
                    break
                after = hits[-1]["sort"]
        close()
        return out

    def account_windows(self, window: timedelta, ai_cluster_ids: Collection[str], *,
                        min_ai_pictures: int = 0) -> list[AccountWindow]:
        """See ``FindingsStore.account_windows``. Each account's window ends
        at its own last post, so no one query covers them all: a composite
        aggregation first finds every account's last post and its posts in
        AI clusters overall; an account with fewer of those than
        ``min_ai_pictures`` cannot have that many AI pictures in any window
        and is dropped there (an exact bound, unlike a cardinality). The
        rest are counted within their windows, ``WINDOW_CHUNK`` accounts a
        request (a ``filters`` aggregation, one filter per account and
        window; distinct pictures by ``cardinality``, exact up to 40,000 an
        account and window). With the desk's threshold of a few AI pictures
        the second step reads only accounts that posted AI pictures at all."""
        ai = R.in_ids("cluster_id", ai_cluster_ids)
        index = self.names["sightings"]
        lasts: list[tuple[str, int]] = []
        for b in self._composite(index, {"match_all": {}}, "account_id",
                                 {"last": {"max": {"field": "@timestamp"}}, "ai": {"filter": ai}}, ACCOUNT_PAGE):
            if b["ai"]["doc_count"] >= min_ai_pictures and b["last"]["value"] is not None:
                lasts.append((b["key"]["key"], int(b["last"]["value"])))
        window_ms = window / timedelta(milliseconds=1)
        pictures = {"cardinality": {"field": "sha256", "precision_threshold": CARDINALITY_PRECISION}}
        out: list[AccountWindow] = []
        for i in range(0, len(lasts), WINDOW_CHUNK):
            chunk = lasts[i:i + WINDOW_CHUNK]
            filters = {account: {"bool": {"filter": [
                {"term": {"account_id": account}},
                # up to the last post found above: posts arriving meanwhile wait for the next check
                {"range": {"@timestamp": {"gte": math.ceil(last - window_ms), "lte": last, "format": "epoch_millis"}}},
            ]}} for account, last in chunk}
            aggs = {"by": {"filters": {"filters": filters}, "aggs": {
                "pictures": pictures, "ai": {"filter": ai, "aggs": {"pictures": pictures}},
                "platforms": R.PLATFORMS_AGG,
                # the earliest-recorded of equal last posts, as a pass in posting order keeps
                "last": {"top_hits": {"size": 1, "sort": [{"@timestamp": "desc"}, {"event_id": "asc"}],
                                      "_source": ["posted_at"]}},
            }}}
            res = self._search(index, size=0, query={"terms": {"account_id": [a for a, _ in chunk]}}, aggs=aggs)
            buckets = ((res.get("aggregations") or {}).get("by") or {}).get("buckets") or {}
            for account, _last in chunk:
                b = buckets.get(account)
                if not b or not b["doc_count"] or int(b["ai"]["pictures"]["value"]) < min_ai_pictures:
                    continue
                out.append(AccountWindow(
                    account_id=account, pictures=int(b["pictures"]["value"]),
                    ai_pictures=int(b["ai"]["pictures"]["value"]), posts=b["doc_count"],
                    platforms=R.platforms_of(b["platforms"]["buckets"]),
                    last_seen=b["last"]["hits"]["hits"][0]["_source"]["posted_at"]))
        return out
