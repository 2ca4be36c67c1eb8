"""What the Elasticsearch findings store writes with, put in place at
start (``IndexSetup.ensure_setup``): the ILM policy, the component and index
templates, the stored upsert script, the indices behind the aliases and the
sightings data stream, each existing index's mapping brought up to this
version where the steps between allow it (``streams.es_templates``)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import TYPE_CHECKING, Any

from streams import es_templates as T
from streams.es_client import EsConfig, EsError, error_reason, explain

log = logging.getLogger("deepwatch.es")

ALIASED = ("clusters", "alerts", "dead_letters", "deliveries", "processed")  # indices behind an alias (not data streams)


def _digest(body: Any) -> str:
    """A digest of what deepwatch PUTs, kept in the object's ``_meta``: what a
    GET answers is normalized by the server (settings, defaults) and cannot
    be compared with the body sent."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _mapping_version(index: str, mappings: dict[str, Any]) -> int | None:
    """An index's mapping version: its ``_meta.mapping_version`` (v4 on, or
    brought up to date in place), else the ``-v<N>`` of its name."""
    v = (mappings.get("_meta") or {}).get("mapping_version")
    if isinstance(v, int):
        return v
    m = re.search(r"-v(\d+)$", index)
    return int(m.group(1)) if m else None


def _merge(into: dict[str, Any], props: dict[str, Any]) -> None:
    """Mapping properties ``props`` added to ``into``, objects merged."""
    for k, v in props.items():
        if isinstance(into.get(k), dict) and "properties" in into[k] and "properties" in v:
            _merge(into[k]["properties"], v["properties"])
        else:
            into[k] = json.loads(json.dumps(v))


class IndexSetup:
    """Setup of ``streams.es_store.EsFindingsStore``, which this is mixed into."""

    # Provided by ``EsFindingsStore``.
    es: Any
    config: EsConfig
    prefix: str
    names: dict[str, str]
    _ready: bool
    if TYPE_CHECKING:
        def server_info(self) -> dict[str, Any]: ...

    def ensure_setup(self) -> None:
        """Put in place what this version writes with. The ILM policy, the
        component and index templates and the upsert script are each read
        first (GET) and PUT only when missing or different (templates and
        policy by a digest of deepwatch's body in their ``_meta``, the
        script by its source): a role without the privilege to change them
        (cluster ``manage`` for the script, docs/elasticsearch.md) starts
        once an admin installed them, and a 403 on a PUT of something that
        is there is a warning, not a hold. Then the indices behind the
        aliases, created when missing, and the sightings data stream; each
        existing one's mapping version is read (``GET <alias>/_mapping``)
        and brought up to this one where the steps between only add fields
        (``T.MIGRATIONS``), the start is refused with one line naming the
        migration where a step needs a reindex, and the sightings data
        stream is rolled over (on its next write) where a step changed its
        analysis. Idempotent; every
        worker runs it at start. Errors are raised held (``EsError.hold``)
        where an operator's fix lets the same call succeed later."""
        if self._ready:
            return
        self.server_info()
        es = self.es
        try:
            policy = T.ilm_policy()["policy"]
            policy = {**policy, "_meta": {**policy["_meta"], "digest": _digest(policy)}}
            self._install(f"ILM policy {self.names['sightings']}",
                          lambda: self._ilm_digest(self.names["sightings"]), policy["_meta"]["digest"],
                          lambda: es.ilm.put_lifecycle(name=self.names["sightings"], policy=policy))
            current = True  # every template this version's: what a rollover makes an index from
            for name, body in T.component_templates(self.prefix).items():
                digest = _digest(body)
                current &= self._install(f"component template {name}", lambda: self._template_digest("component", name),
                                         digest, lambda: es.cluster.put_component_template(
                                             name=name, template=body["template"], version=body["version"],
                                             meta={**body["_meta"], "digest": digest}))
            for name, body in T.index_templates(self.prefix).items():
                digest = _digest(body)
                put = {**body, "_meta": {**body["_meta"], "digest": digest}}
                current &= self._install(f"index template {name}", lambda: self._template_digest("index", name), digest,
                                         lambda: es.indices.put_index_template(
                                             name=name, **{k if k != "_meta" else "meta": v for k, v in put.items()}))
            script = T.stored_script()["script"]
            self._install(f"stored script {T.SCRIPT_ID}", self._script_source, script["source"],
                          lambda: es.put_script(id=T.SCRIPT_ID, script=script))
            for key in ALIASED:
                alias = self.names[key]
                if not es.indices.exists_alias(name=alias):
                    self._create_ignoring_exists(lambda: es.indices.create(
                        index=T.concrete(alias), aliases={alias: {"is_write_index": True}}))
            self._create_ignoring_exists(lambda: es.indices.create_data_stream(name=self.names["sightings"]))
            self._migrate(templates_current=current)
        except EsError:
            raise
        except Exception as e:
            raise explain(e, self.config.url) from None
        self._ready = True

    def _install(self, what: str, current: Any, wanted: Any, put: Any) -> bool:
        """``current()`` (None: missing) against ``wanted``; ``put()`` only
        when missing or different. Credentials that may not read it (403 on
        the GET) try the PUT; credentials that may not PUT it leave what an
        admin installed, with a warning, and when it is missing raise one
        line saying so, held: the batch waits until an admin installs it.
        Returns whether ``wanted`` is in place (False: left as it was)."""
        from elasticsearch import AuthorizationException

        try:
            have, readable = current(), True
        except AuthorizationException:
            have, readable = None, False
        if readable and have == wanted:
            return True
        try:
            put()
            return True
        except AuthorizationException as e:
            if readable and have is None:
                raise EsError(f"Elasticsearch at {self.config.url}: the {what} is not installed and these credentials "
                              f"may not install it ({error_reason(e)}); install it once as an admin (`deepwatch` "
                              "with admin credentials, or see docs/elasticsearch.md, \"The role deepwatch needs\")",
                              hold=True) from None
            log.warning(f"the {what} {'differs from this version' if readable else 'could not be read'} and these "
                        "credentials may not install it: using it as an admin installed it",
                        extra={"what": what, "error": error_reason(e)})
            return False

    def _ilm_digest(self, name: str) -> str | None:
        from elasticsearch import NotFoundError

        try:
            found = self.es.ilm.get_lifecycle(name=name)
        except NotFoundError:
            return None
        return ((found.get(name) or {}).get("policy") or {}).get("_meta", {}).get("digest") or ""

    def _template_digest(self, kind: str, name: str) -> str | None:
        from elasticsearch import NotFoundError

        try:
            if kind == "component":
                found = self.es.cluster.get_component_template(name=name)["component_templates"]
            else:
                found = self.es.indices.get_index_template(name=name)["index_templates"]
        except NotFoundError:
            return None
        for t in found:
            if t.get("name") == name:
                return ((t.get(f"{kind}_template") or {}).get("_meta") or {}).get("digest") or ""
        return None

    def _script_source(self) -> str | None:
        from elasticsearch import NotFoundError

        try:
            found = self.es.get_script(id=T.SCRIPT_ID)
        except NotFoundError:
            return None
        return (found.get("script") or {}).get("source") if found.get("found", True) else None

    def _migrate(self, templates_current: bool = True) -> None:
        """Each index behind an alias (and the sightings data stream's
        backing indices) brought up to ``T.MAPPING_VERSION`` where the
        versions between only added fields: one ``PUT <alias>/_mapping``
        with the fields and the new ``_meta``; nothing for an index already
        there. A ``REINDEX`` step outstanding: one line naming it, and no
        start (every write would be refused, or worse, mapped wrong). A
        ``ROLLOVER`` step (a data stream whose analysis changed, which no
        backing index takes in place): the fields added before it are put
        in place, stamped with the version before it, and the stream is
        rolled over on its next write (``lazy``: every worker starting asks,
        one new backing index is made), from the template this version
        installed; its older backing indices keep their analysis."""
        outstanding: list[str] = []
        puts: list[tuple[str, int, int, dict[str, Any]]] = []  # (alias, its version, the version put, the fields)
        rollovers: list[tuple[str, int, int]] = []  # (data stream, its write index's version, the step's version)
        for key in (*ALIASED, "sightings"):
            alias = self.names[key]
            found = dict(self.es.indices.get_mapping(index=alias))
            versions = {index: _mapping_version(index, body.get("mappings") or {}) for index, body in found.items()}
            known = [v for v in versions.values() if v is not None]
            # a data stream's newest backing index takes its writes; an unknown version (no
            # _meta, no -v<N>: made by hand, or a data stream from before v4) gets every addition
            at = max(known) if known else 0
            if at >= T.MAPPING_VERSION:
                continue
            added: dict[str, Any] = {}
            reached = at
            reindex = False
            for n in range(at + 1, T.MAPPING_VERSION + 1):
                step = T.MIGRATIONS.get(n, {})
                if key not in step:
                    reached = n
                    continue
                # an index behind an alias has no rollover of its own: a changed analysis is a reindex there
                if step[key] is T.REINDEX or (step[key] == T.ROLLOVER and key in ALIASED):
                    if known and not reindex:
                        index = max(versions, key=lambda i: versions[i] or 0)
                        what = "field types" if step[key] is T.REINDEX else "text analysis"
                        outstanding.append(f"{alias} is {index}, mapping v{at}: mapping v{n} changed {what}, "
                                           f"reindex it into {T.concrete(alias)} and move the alias")
                    reindex = reindex or bool(known)
                    reached = n
                    continue
                if step[key] == T.ROLLOVER:
                    # what comes after is in the template the next backing index is made from
                    rollovers.append((alias, at, n))
                    break
                _merge(added, step[key])
                reached = n
            if not reindex and (reached > at or added):
                puts.append((alias, at, reached, added))
        if outstanding:
            # nothing put in place: the operator's reindex starts from the index as it was
            raise EsError(f"Elasticsearch at {self.config.url}: {'; '.join(outstanding)} "
                          "(docs/elasticsearch.md, \"Mapping versions\"); not starting", hold=True)
        for alias, at, reached, added in puts:
            self.es.indices.put_mapping(index=alias, properties=added, meta=T.mapping_meta(reached))
            log.info(f"{alias}: mapping brought up from v{at} to v{reached} in place",
                     extra={"alias": alias, "fields": sorted(added)})
        for stream, at, n in rollovers:
            if not templates_current:
                # a rollover would make the new backing index from the old template: one more index at
                # the old version per start, never the new analysis
                log.warning(f"{stream}: its write index is mapping v{at} and the templates are not this version's "
                            "(these credentials may not install them): not rolled over until an admin installs them "
                            "(docs/elasticsearch.md, \"The role deepwatch needs\")", extra={"stream": stream})
                continue
            self._roll_over(stream, at, n)

    def _roll_over(self, stream: str, at: int, n: int) -> None:
        """Ask for ``stream``'s rollover on its next write: its new backing
        index is made from this version's template. Credentials that may
        not (the ``manage`` index privilege) leave it to ILM's next daily
        rollover, with a warning: the stream's mapping takes this version's
        documents as it is, only their analysis is the old one meanwhile."""
        from elasticsearch import AuthorizationException

        try:
            self.es.indices.rollover(alias=stream, lazy=True)
        except AuthorizationException as e:
            log.warning(f"{stream}: its write index is mapping v{at} and these credentials may not roll it over: "
                        f"sightings written until ILM's next rollover keep mapping v{at}'s text analysis "
                        "(docs/elasticsearch.md, \"Mapping versions\")",
                        extra={"stream": stream, "error": error_reason(e)})
            return
        log.info(f"{stream}: its write index is mapping v{at}, mapping v{n} changed its text analysis: rolled over on "
                 "its next write; sightings stored before keep theirs until ILM deletes them",
                 extra={"stream": stream})

    @staticmethod
    def _create_ignoring_exists(create) -> None:
        from elasticsearch import BadRequestError

        try:
            create()
        except BadRequestError as e:  # another worker created it first
            if "already_exists" not in str(error_reason(e)):
                raise
