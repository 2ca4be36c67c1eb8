"""The analyze stage's kept analyses (``streams.analyze``): one typed record
(``KeptAnalysis``, versioned) read by one function (``read_analysis``) that
both readers use, the stage's cache and ``recorded_hashes``: a good file
reads the same for both, a damaged or stale one reads as none for both, is
removed, and is computed again."""

from __future__ import annotations

import io
import json

import pytest

import streams.analyze as analyze
from detectors.hashing import compute_hashes
from detectors.imagedata import ImageData
from streams.blobstore import DirectoryBlobStore
from streams.settings import Settings
from tests.support import picture


@pytest.fixture
def kept(tmp_path):
    """(settings, analyzer, sha256, the kept file) of a picture analysed and stored."""
    settings = Settings(data_dir=tmp_path)
    analyzer = analyze.Analyzer(settings, tmp_path / "blobs")
    buf = io.BytesIO()
    picture(3, (200, 150)).save(buf, "JPEG", quality=85)
    sha = DirectoryBlobStore(tmp_path / "blobs").put(buf.getvalue())
    analyzer._analyse(buf.getvalue(), sha)
    return settings, analyzer, sha, analyze.analysis_path(tmp_path / "blobs", sha), buf.getvalue()


def test_a_good_file_reads_the_same_for_both_readers(kept):
    settings, analyzer, sha, path, data = kept
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == analyze.ANALYSIS_CACHE_VERSION and set(doc) == {"schema_version", "hashes", "evidence"}
    record = analyze.read_analysis(path)
    assert isinstance(record, analyze.KeptAnalysis)
    assert analyzer._load_cache(sha) == (record.hashes, record.evidence)
    assert analyze.recorded_hashes(settings, sha) == record.hashes == compute_hashes(ImageData(data))
    assert path.exists()


def test_a_file_written_before_the_record_had_a_version_still_reads(kept):
    settings, analyzer, sha, path, _ = kept
    doc = json.loads(path.read_text())
    del doc["schema_version"]  # the format before: the version only in the file name
    path.write_text(json.dumps(doc))
    assert analyze.read_analysis(path).schema_version == analyze.ANALYSIS_CACHE_VERSION
    assert analyzer._load_cache(sha) is not None and analyze.recorded_hashes(settings, sha) is not None
    assert path.exists()


@pytest.mark.parametrize("damage", ["not json {", '{"hashes": 1}', "[]", '{"schema_version": 999}'])
@pytest.mark.parametrize("reader", ["stage", "recorded_hashes"])
def test_a_damaged_or_stale_file_is_recomputed_by_either_reader(kept, damage, reader):
    settings, analyzer, sha, path, data = kept
    good = json.loads(path.read_text())
    path.write_text(damage if damage != '{"schema_version": 999}' else json.dumps({**good, "schema_version": 999}))
    if reader == "stage":
        assert analyzer._load_cache(sha) is None
        assert not path.exists()  # removed: the next analysis writes it anew
        analyzer._recent = type(analyzer._recent)(10)  # not from memory
        assert analyzer._analyse(data, sha).hashes == compute_hashes(ImageData(data))
        assert json.loads(path.read_text()) == good
    else:
        # the hashes again from the stored bytes, as for a picture never analysed; the bad file is gone
        assert analyze.recorded_hashes(settings, sha) == compute_hashes(ImageData(data))
        assert not path.exists()


def test_no_file_is_none_and_nothing_is_removed(tmp_path):
    assert analyze.read_analysis(tmp_path / "none.json") is None
