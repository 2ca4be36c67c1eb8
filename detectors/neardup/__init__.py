"""Near-duplicate clustering of news images: the same picture, whatever was done
to the file (recompressed, resized, cropped, captioned, mirrored), is one cluster.

* ``clusters``: ``ClusterIndex`` -- the decision rule, merges, chaining bound.
* ``hamming``: ``HammingIndex`` -- exact batched Hamming range search (MIH).

Crops and screenshots are matched through *views* (``ImageHashes.views``: the
content inside a detected border, 90%/80% centre crops), indexed in the same
pHash index as extra codes of the member (~3.1 codes per member on the bench
data; ``ClusterIndex`` docstring has the pairing rule). Members rebuilt
without views still match on their full hashes; persisting ``views`` and
``trimmed`` with members keeps crop-of-a-member matching across rebuilds.

Distribution design
-------------------
Near neighbours cannot be found by key-partitioning: two reposts of one picture
have different sha256 and different (if close) hashes, so no partitioning key
sends them to the same worker, and LSH-style bucketing by hash prefix is lossy
(a one-bit change in the prefix moves the image). The stream therefore keeps
*one* logical cluster index:

* **Single writer.** A cluster agent consumes a 1-partition ``dedupe`` topic and
  is the only process that calls ``ClusterIndex.assign``. Its decisions (new
  member -> cluster id, merges, representative flag, last-seen) are written to a
  changelog-backed table. ``assign`` is deterministic and reads only index
  state, so a restarted writer that replays the changelog (``add``/``merge``)
  and then the uncommitted tail of the topic reproduces the same ids and merges.
* **Read replicas.** Every worker rebuilds a replica ``ClusterIndex`` from the
  same changelog and uses ``lookup`` for reads (``deepwatch similar``, enriching
  alerts, bank checks), so reads scale with workers without touching the writer.
* **Scaling the writer.** The writer's work per image is one batched range
  search (~sub-millisecond at millions of codes, see ``bench/neardup.py``) plus
  a dict update; hashing -- the expensive part -- happens upstream in the
  partitioned workers, which send only (sha256, hashes, ts) to the writer. If one
  writer is ever not enough, workers can pre-filter with their replica: an image
  whose sha256 is already a member, or whose lookup finds exactly one cluster,
  can be answered locally and only *founding* and *linking* images need the
  writer's serialisation; the writer still records every decision so merges stay
  single-sourced.
* **Bounded memory.** ``evict_older_than(ts)`` drops clusters not seen since
  ``ts`` (event time) from the hot set; the caller persists them in the findings
  store, where ``deepwatch similar`` can still find them. A cold picture that
  comes back founds a fresh hot cluster (the caller may link it to the archived
  one by a store lookup).
"""

from detectors.neardup.clusters import Assignment, ClusterIndex, Match, MergeAudit, Via, cluster_id_for, pair_match
from detectors.neardup.hamming import HammingIndex

__all__ = ["Assignment", "ClusterIndex", "HammingIndex", "Match", "MergeAudit", "Via", "cluster_id_for", "pair_match"]
