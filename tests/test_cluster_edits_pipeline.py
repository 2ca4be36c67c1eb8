"""An edit stays apart from its picture on the real broker, through the real
CLI (embedded Tansu, a Faust worker process): the cluster stage reads the
images' bytes from the blob store the analyze stage wrote
(``streams.clustering.blob_pixels``), so an edited copy whose 32x32 record
verifies against the picture (``tests/test_cluster_edits.py``) founds its own
cluster, while the picture's reposts -- recompressed, half size, a caption
bar, a 90% crop -- join the picture."""

from __future__ import annotations

import pytest

from bench.neardup_transforms import _bar, _crop
from streams.demo_feed import jpeg_bytes
from tests.test_cluster_edits import _pair
from tests.test_cluster_precision_pipeline import write_feed
from tests.test_pipeline_e2e import deepwatch, query

pytestmark = pytest.mark.slow
ONE_PARTITION = {"DEEPWATCH_PARTITIONS": "1"}  # file order: the picture founds its cluster first


def test_an_edited_copy_stays_apart_through_the_blob_store(tmp_path):
    img, edit = _pair(1)
    files = {
        "picture.jpg": (img, 88, "P"), "edit.jpg": (edit, 88, "E"), "q70.jpg": (img, 70, "P"),
        "half.jpg": (img.resize((240, 180)), 88, "P"),
        "bar.jpg": (_bar(img, 1 / 8, "bottom", text="BREAKING NEWS"), 88, "P"),
        "crop.jpg": (_crop(img, 0.9), 88, "P"),
    }
    feed = write_feed(tmp_path, {name: jpeg_bytes(im, q) for name, (im, q, _) in files.items()})
    data = tmp_path / "data"
    r = deepwatch("replay", str(feed), "--data-dir", str(data), "--json", "--timeout", "240", env=ONE_PARTITION)
    assert r.returncode == 0, f"replay failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    clusters = query("clusters", data)
    member_of = {m["event_id"]: c["id"] for c in clusters for m in c["members"]}
    assert len(clusters) == 2, [(c["id"], len(c["members"])) for c in clusters]
    picture = {member_of[f"ev-{n}"] for n, (_, _, who) in files.items() if who == "P"}
    assert len(picture) == 1 and member_of["ev-edit.jpg"] not in picture
    assert sum(c["sightings"] for c in clusters) == len(files)
