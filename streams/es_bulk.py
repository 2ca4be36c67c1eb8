"""Elasticsearch's bulk protocol, for the Elasticsearch findings store
(``streams.es_store``).

``BulkSink`` is how findings reach Elasticsearch: the sink agents
(``streams.sink_stage``) hand it batches (``bulk_max_actions`` within
``bulk_flush_s``: by size and by time), it splits them by bytes, retries 429/5xx with capped exponential
backoff (the whole request or just the rejected items; an item answered 500,
or 409 on an update, at most ``ITEM_MAX_ATTEMPTS`` times), splits a request
refused whole for what it carries (413, an Elasticsearch 400) until the
refused action is alone, and dead-letters only an item Elasticsearch refuses
for good (e.g. a mapping error) with the reason, while the rest of the batch
carries on; a refusal naming no action (401/403, a wrong path) is raised
held, never acked unstored. It never gives up on retryable
failures: the agent awaits it, so while it is behind the agent takes nothing
more from its topic, offsets are not committed, and Faust stops fetching once
its buffers fill (backpressure; nothing is dropped, a crash replays).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from streams import metrics
from streams.records import DeadLetter
from streams.settings import FindingsSettings

log = logging.getLogger("deepwatch.alerts")

# ``deepwatch_sink_behind_seconds``: the oldest write of this process still
# retrying (a sink agent's batch, a bulk request), 0 when none is; one for
# the process, shared with ``streams.sinks.Sinks``.
BEHIND = metrics.OldestWait(metrics.SINK_BEHIND_SECONDS)


Action = tuple[dict[str, Any], "dict[str, Any] | None"]  # bulk header line, source line (None for delete)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Item answers retried a bounded number of times only: a 500 (an error inside
# the shard about this document) or a 409 on an update (concurrent writers
# beat ``retry_on_conflict`` again and again) can come back every time, and
# one such document retried for ever stopped the sink for good. A 429 or a
# 502/503/504 item is the cluster's state (overload, a shard unavailable),
# not the document's: those wait as long as the cluster does.
CAPPED_ITEM_STATUS = frozenset({500, 409})
# Whole-request answers that do not say whether Elasticsearch applied the
# request: a gateway's (a proxy or load balancer between) gave up waiting or
# lost the upstream. 429 and 503 are Elasticsearch refusing before it applies.
AMBIGUOUS_STATUS = frozenset({502, 504})
ITEM_MAX_ATTEMPTS = 10  # with the doubling backoff: about two minutes at the defaults, then a dead letter


@dataclass
class BulkResult:
    ok: int = 0  # applied (created, updated, no-op) or already there
    created: int = 0  # create actions that made a new document (in an unanswered attempt of this call too)
    created_in: dict[str, int] = field(default_factory=dict)  # the same, by index (as the action named it)
    duplicates: int = 0  # create actions whose id was already there (redelivery)
    retried: int = 0  # item retries plus whole-request retries
    dead_lettered: int = 0
    split: int = 0  # requests refused whole (413, 400) and sent again as two halves


class BulkSink:
    """Sends bulk actions until each one is applied or dead-lettered.

    A request refused as a whole never loses its actions: 429/5xx and
    connection errors are retried with backoff; 413 (a proxy's or the
    server's body limit) and an Elasticsearch 400 about the request (an
    ``_id`` over 512 bytes refuses every action with it) are split in halves
    until the refused action is alone, which alone becomes a dead letter;
    any other refusal (401/403, a 404 from a wrong path, the API version) is
    raised held (``EsError.hold``), so ``Sinks`` keeps the batch and retries
    it rather than the agent acking what was never stored."""

    def __init__(self, client: Any, settings: FindingsSettings, *, dead_letters_index: str,
                 processed_index: str | None = None, sleep: Callable[[float], None] = time.sleep,
                 url: str = "the findings store"):
        self.es = client
        self.url = url  # as errors name it
        self.settings = settings
        self.dead_letters_index = dead_letters_index
        self.processed_index = processed_index
        self.sleep = sleep
        # the smallest request (NDJSON bytes) answered 413 so far: later chunks stay under it, so
        # a body limit below ``bulk_max_bytes`` (an ingress's 1 MiB) costs one split, not one a batch
        self.refused_bytes: int | None = None

    def send(self, actions: list[Action]) -> BulkResult:
        result = BulkResult()
        me = object()  # this call, in the clock of writes that are behind: agents share this sink
        try:
            for chunk in self._chunks(actions):
                self._send_chunk(chunk, result, me)
        finally:
            BEHIND.done(me)
        return result

    def max_bytes(self) -> int:
        """``bulk_max_bytes``, or less once a smaller request was answered 413."""
        cap = self.settings.bulk_max_bytes
        return cap if self.refused_bytes is None else max(1, min(cap, self.refused_bytes - 1))

    def _chunks(self, actions: list[Action]):
        """Split by action count and NDJSON bytes; one oversized action goes alone."""
        chunk: list[Action] = []
        size = 0
        for a in actions:
            n = len(_ndjson([a]))
            if chunk and (len(chunk) >= self.settings.bulk_max_actions or size + n > self.max_bytes()):
                yield chunk
                chunk, size = [], 0
            chunk.append(a)
            size += n
        if chunk:
            yield chunk

    def _backoff(self, delay: float, why: str, count: int, me: object) -> float:
        BEHIND.waiting(me)
        log.warning("findings sink behind: retrying", extra={"why": why, "items": count, "delay_s": delay})
        self.sleep(delay)
        return min(delay * 2, self.settings.retry_max_s)

    def _send_chunk(self, todo: list[Action], result: BulkResult, me: object, *, dead_letters: bool = True,
                    unanswered: set[int] | None = None) -> None:
        from elasticsearch import ApiError, ConnectionError as EsConnectionError, ConnectionTimeout

        delay = self.settings.retry_initial_s
        attempts: dict[int, int] = {}  # id(action) -> its answers in CAPPED_ITEM_STATUS so far
        # id(action) of actions sent in a request whose answer never came (a timeout, a dropped
        # connection, a gateway's 502/504): Elasticsearch may have applied them, so a 409 on
        # their ``create`` now is this call's own document, not one stored before it
        unanswered = set() if unanswered is None else unanswered
        while todo:
            try:
                # our own retrying (per item, never giving up), not the client's
                resp = self.es.options(max_retries=0, retry_on_status=()).bulk(operations=_lines(todo))
            except (EsConnectionError, ConnectionTimeout) as e:
                result.retried += 1
                unanswered.update(id(a) for a in todo)
                delay = self._backoff(delay, f"{type(e).__name__}", len(todo), me)
                continue
            except ApiError as e:
                if e.meta.status in RETRYABLE_STATUS:
                    if e.meta.status in AMBIGUOUS_STATUS:
                        unanswered.update(id(a) for a in todo)
                    result.retried += 1
                    delay = self._backoff(delay, f"HTTP {e.meta.status}", len(todo), me)
                    continue
                if self._refused_whole(e, todo, result, me, dead_letters, unanswered):
                    return
                from streams.es_client import explain

                # 401/403 (an operator fixes the credentials), a 404 or 405 (a wrong path or a
                # proxy in the way), the API version: nothing the actions carry, so nothing to
                # dead-letter; held, so ``Sinks`` retries the batch with backoff rather than the
                # agent acking what was never stored
                err = explain(e, self.url)
                err.hold = True
                raise err from None
            retry: list[Action] = []
            failed: list[tuple[Action, dict[str, Any]]] = []
            for action, item in zip(todo, resp["items"]):
                op, r = next(iter(item.items()))
                index = _index_key(action)
                status = r.get("status", 500)
                if 200 <= status < 300:
                    result.ok += 1
                    if op == "create" and r.get("result") == "created":
                        result.created += 1
                        result.created_in[index] = result.created_in.get(index, 0) + 1
                    metrics.SINK_ITEMS.labels(index, "ok").inc()
                elif status == 404 and op == "delete":
                    # already gone (a superseded dead letter another writer removed first): what was asked
                    result.ok += 1
                    metrics.SINK_ITEMS.labels(index, "ok").inc()
                elif op == "delete" and status not in RETRYABLE_STATUS:
                    # a superseded dead letter or moved delivery record that may not be deleted (a role
                    # without the ``delete`` privilege: docs/elasticsearch.md): no event of its own to
                    # dead-letter; it stays beside its newer record, said here
                    _not_deleted(action, r.get("error"), status)
                elif status == 409 and op == "create" and id(action) in unanswered:
                    # created by this call's unanswered request: an alert stored so is a new alert
                    # (its console line and count), not a redelivered one
                    result.ok += 1
                    result.created += 1
                    result.created_in[index] = result.created_in.get(index, 0) + 1
                    metrics.SINK_ITEMS.labels(index, "ok").inc()
                elif status == 409 and op == "create":
                    result.ok += 1
                    result.duplicates += 1
                    metrics.SINK_ITEMS.labels(index, "duplicate").inc()
                elif status in RETRYABLE_STATUS or status == 409:
                    # 409 on an update: concurrent writers beat retry_on_conflict; the script is idempotent
                    if status in CAPPED_ITEM_STATUS:
                        n = attempts[id(action)] = attempts.get(id(action), 0) + 1
                        if n >= ITEM_MAX_ATTEMPTS:
                            failed.append((action, {**r, "attempts": n}))
                            continue
                    retry.append(action)
                    metrics.SINK_ITEMS.labels(index, "retried").inc()
                elif _script_missing(r):
                    from streams.es_client import EsError

                    # the stored upsert script is not installed (a role without cluster ``manage``
                    # relies on an admin installing it): no document's fault, so none is
                    # dead-lettered; held until it is installed
                    raise EsError(f"Elasticsearch at {self.url}: {r['error'].get('reason')}: install the stored "
                                  "script as an admin (docs/elasticsearch.md, \"The role deepwatch needs\")", hold=True)
                else:
                    failed.append((action, r))
            # a delete that still fails names no event: logged, never dead-lettered (a dead
            # letter named after the deleted one's key was a third outcome of its event)
            for action, r in [(a, r) for a, r in failed if _op(a) == "delete"]:
                _not_deleted(action, r.get("error"), r.get("status"))
            failed = [(a, r) for a, r in failed if _op(a) != "delete"]
            if failed:
                if dead_letters:
                    self._dead_letter(failed, result, me)
                else:
                    for action, r in failed:
                        log.error("dead letter refused by the findings store; logged here only",
                                  extra={"action": action[0], "error": r.get("error")})
            if retry:
                result.retried += len(retry)
                delay = self._backoff(delay, "items rejected", len(retry), me)
            todo = retry

    def _refused_whole(self, e: Any, todo: list[Action], result: BulkResult, me: object, dead_letters: bool,
                       unanswered: set[int]) -> bool:
        """A request refused for what it carries: 413 (too large for the
        server or a proxy in front of it, whatever the body says) or an
        Elasticsearch 400 other than the API-version one (request
        validation refuses every action of a request for one bad action:
        an ``_id`` over 512 bytes, elastic/elasticsearch#54549). Sent again
        as two halves until the refused action is alone; that one is
        dead-lettered (logged, for a dead letter's own request). False: not
        such a refusal, the caller raises it."""
        from streams.es_client import error_reason, es_error_body

        status = e.meta.status
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        if status == 413:
            size = len(_ndjson(todo))
            self.refused_bytes = size if self.refused_bytes is None else min(self.refused_bytes, size)
            kind = err.get("type") or "request_entity_too_large"
        elif status == 400 and es_error_body(e) and err.get("type") != "media_type_header_exception":
            kind = err.get("type") or "http_400"
        else:
            return False
        if len(todo) > 1:
            result.split += 1
            half = len(todo) // 2
            log.warning(f"findings bulk request refused whole (HTTP {status}); sending it again as two halves",
                        extra={"status": status, "items": len(todo), "error": error_reason(e)})
            for part in (todo[:half], todo[half:]):
                self._send_chunk(part, result, me, dead_letters=dead_letters, unanswered=unanswered)
            return True
        why = {"type": kind, "reason": f"the request of this action alone was refused (HTTP {status}): {error_reason(e)}"}
        if _op(todo[0]) == "delete":  # a delete names no event of its own
            _not_deleted(todo[0], why, status)
        elif dead_letters:
            self._dead_letter([(todo[0], {"status": status, "error": why})], result, me)
        else:
            log.error("dead letter refused by the findings store; logged here only",
                      extra={"action": todo[0][0], "error": why})
        return True

    def _dead_letter(self, failed: list[tuple[Action, dict[str, Any]]], result: BulkResult, me: object) -> None:
        from streams.es_docs import dead_letter_doc, dead_letter_key, processed_action
        from streams.records import SourceRef

        actions: list[Action] = []
        for (header, source), r in failed:
            op, meta = next(iter(header.items()))
            err = r.get("error") or {}
            reason = _refusal_reason(err, r.get("status"))  # a metric label: bounded, the text goes in detail
            detail = err.get("reason", str(err)) if isinstance(err, dict) else str(err)
            if r.get("attempts"):
                detail = f"still refused (HTTP {r.get('status')}) after {r['attempts']} attempts: {detail}"
            src = (source or {}).get("source")
            dl = DeadLetter(
                event_id=(source or {}).get("event_id") or meta.get("_id"), stage="sink", reason=reason[:200],
                detail=f"{op} {meta.get('_index')}/{meta.get('_id')}: {detail}"[:2000],
                source=SourceRef(**src) if isinstance(src, dict) else None,
                payload_excerpt=json.dumps(source, default=str)[:512] if source is not None else None,
            )
            metrics.DEAD_LETTERS.labels("sink", dl.reason).inc()
            metrics.SINK_ITEMS.labels(_index_key((header, source)), "dead_letter").inc()
            log.error("findings item refused; dead-lettered", extra={"reason": dl.reason, "detail": dl.detail})
            actions.append(({"create": {"_index": self.dead_letters_index, "_id": dead_letter_key(dl)}},
                            dead_letter_doc(dl)))
            if dl.source is not None and self.processed_index:
                actions.append(processed_action(self.processed_index, dl.source, "dead_letter", dl.event_id, op="index"))
            result.dead_lettered += 1
        self._send_chunk(actions, BulkResult(), me, dead_letters=False)


# An Elasticsearch error type (``document_parsing_exception``): one of a fixed set of names
_ERROR_TYPE = re.compile(r"[a-z][a-z0-9_.]{0,99}")


def _refusal_reason(err: Any, status: Any) -> str:
    """The dead letter's reason for a refused bulk item, which is also the
    ``reason`` label of ``deepwatch_dead_letters_total``: Elasticsearch's error
    type, else ``http_<status>``. Never the error's text: a proxy's or an
    older server's string error (an id, a document's values) was the label,
    one new series per refused item."""
    kind = err.get("type") if isinstance(err, dict) else None
    if isinstance(kind, str) and _ERROR_TYPE.fullmatch(kind):
        return kind
    return f"http_{status}" if isinstance(status, int) and 100 <= status <= 599 else "refused"


def _script_missing(r: dict[str, Any]) -> bool:
    """A bulk item refused because the stored script it names is not there."""
    err = r.get("error")
    return (isinstance(err, dict) and err.get("type") == "resource_not_found_exception"
            and "script" in str(err.get("reason") or ""))


def _op(action: Action) -> str:
    """The bulk operation of ``action``: create, index, update or delete."""
    return next(iter(action[0]))


# what a bulk request deletes, by its index's name (``es_templates.index_names``; a dead letter
# is deleted from its backing index, ``.ds-<prefix>-dead-letters-...``)
_DELETED = {"-dead-letters": "superseded dead letter", "-deliveries": "delivery record moved to its hook's key"}


def _not_deleted(action: Action, error: Any, status: int | None = None) -> None:
    """Log a delete that did not go through, naming what it was for (its
    index and document id): the document stays beside its newer record."""
    meta = next(iter(action[0].values()))
    index = _index_key(action)
    kind = next((k for part, k in _DELETED.items() if part in index), "findings document")
    log.error(f"{kind} not deleted" + ("; grant the role the 'delete' index privilege" if status == 403 else ""),
              extra={"index": index, "id": meta.get("_id"), "status": status, "error": error})


def _index_key(action: Action) -> str:
    meta = next(iter(action[0].values()))
    return str(meta.get("_index", "?"))


def _lines(actions: list[Action]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for header, source in actions:
        out.append(header)
        if source is not None:
            out.append(source)
    return out


def _ndjson(actions: list[Action]) -> bytes:
    return b"".join(json.dumps(x, separators=(",", ":"), default=str).encode() + b"\n" for x in _lines(actions))
