"""Near-duplicate clustering of news images: the same picture, whatever was done
to the file (recompressed, resized, cropped, captioned, mirrored), is one cluster.

* ``pairing``: the hash pair rule -- the codes an image carries (full frame,
  mirror, views), their index slots, which pairs may meet; ``pair_match``.
* ``regions``: the thumbnail regions a pair of codes compares.
* ``clusters``: ``ClusterIndex`` -- the decision rule, merges, chaining bound.
* ``hamming``: ``HammingIndex`` -- exact batched Hamming range search (MIH).

Crops and screenshots are matched through *views* (``ImageHashes.views``: the
content inside a detected border, 90%/80% centre crops, off-centre crops,
bands without a caption edge and -- hashes v7 -- side bands), indexed in the same
pHash index as extra codes of the member (~3.1 codes per member on the bench
data; ``pairing`` has the rule). Members rebuilt
without views still match on their full hashes; persisting ``views`` and
``trimmed`` with members keeps crop-of-a-member matching across rebuilds.

Cluster precision
-----------------
Members only nominate candidate clusters; an image joins a cluster when it
matches the cluster's *picture*: one of its representatives (the founder, a
larger copy the founder is a crop of, the founders of merged clusters) with
their views, under the pair rule. So a chain of small drifts (crop of a crop,
a similar picture near a repost) never reaches a different picture. An image
matching several pictures links them only when pHash *and* PDQ both agree with
each side (or its pixels agree with each almost everywhere); a pair it
nominated is also linked when one side's representative would join the
other's picture now (a split by arrival order). Every merge is audited
(``MergeAudit``: link, distances, residuals, the representative), otherwise
it joins the nearest picture and ``declined`` lists the others. Only
representatives are indexed. Flat pictures (PDQ quality < ``FLAT_QUALITY``)
never match detailed ones.

Distribution design
-------------------
Near neighbours cannot be found by key-partitioning: two reposts of one picture
have different sha256 and different (if close) hashes, so no partitioning key
sends them to the same worker. The stream therefore keeps *one* logical
cluster index:

* **Single writer.** The cluster stage (``streams.cluster_stage``) consumes the
  1-partition ``cluster-ops`` topic and is the only caller of
  ``ClusterIndex.assign``. Its decisions live in the changelog-backed
  ``clusters`` table (and, write-through, in ``streams.engine_state``).
  ``assign`` is deterministic and reads only index state, so a restarted
  writer that rebuilds from the table (``add``) and replays the uncommitted
  tail reproduces the same ids and merges.
* **Reads.** ``deepwatch similar`` builds its own index from the findings
  store's members (``index_members=True``: "near any member?"); nothing reads
  the writer's index.
* **Past one writer** (see ``streams.clustering``): candidate search can be
  partitioned by hash bands (the MIH substrings of ``HammingIndex``), with a
  merge protocol on the single ordered topic.
* **Bounded memory.** ``evict_older_than(ts)`` drops clusters not seen since
  ``ts`` (event time) from the hot set; the stage archives their exact state
  in ``streams.engine_state`` and keeps their hashes in a compact cold index.
  A cold picture that comes back *revives* its old cluster (same id, counts
  carry on) instead of founding a fresh one.
"""

from detectors.neardup.clusters import Assignment, ClusterIndex, Match, MergeAudit, cluster_id_for
from detectors.neardup.pairing import Via, pair_match
from detectors.neardup.hamming import HammingIndex

__all__ = ["Assignment", "ClusterIndex", "HammingIndex", "Match", "MergeAudit", "Via", "cluster_id_for", "pair_match"]
