from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from detectors.banks import BankStore, bank_evidence
from detectors.hashing import compute_hashes
from detectors.imagedata import ImageData


def _picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:300, 0:400] / 400
    img = np.zeros((300, 400, 3))
    for _ in range(10):
        fx, fy, ph = rng.uniform(0.5, 10, 2).tolist() + [rng.uniform(0, 6.3)]
        img += rng.uniform(-1, 1, 3) * np.sin(2 * np.pi * (fx * x + fy * y) + ph)[..., None]
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return Image.fromarray(img.astype(np.uint8))


def _save(img: Image.Image, path: Path, q: int = 90) -> Path:
    img.save(path, "JPEG", quality=q)
    return path


def _hashes(img: Image.Image, q: int = 60):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return compute_hashes(ImageData(buf.getvalue()))


def test_add_images_and_match_reposts(tmp_path):
    store = BankStore(tmp_path / "banks.sqlite")
    paths = [_save(_picture(i), tmp_path / f"pic{i}.jpg") for i in range(3)]
    assert store.add_images("afp-debunked", "fake", paths) == 3
    assert store.add_images("afp-debunked", "fake", paths[:1]) == 0  # same bytes: not added twice
    m = store.match(_hashes(ImageOps.mirror(_picture(1).resize((200, 150)))))
    assert [(x.bank, x.entry_id, x.label, x.verdict) for x in m] == [("afp-debunked", "2", "pic1.jpg", "fake")]
    assert m[0].via in ("phash_mirror", "pdq_mirror")
    assert store.match(_hashes(_picture(99))) == []
    assert [(b.name, b.verdict, b.entries) for b in store.list_banks()] == [("afp-debunked", "fake", 3)]


def test_bank_verdict_is_fixed(tmp_path):
    store = BankStore(tmp_path / "b.sqlite")
    store.add_images("x", "fake", [_save(_picture(1), tmp_path / "a.jpg")])
    with pytest.raises(ValueError):
        store.add_images("x", "authentic", [_save(_picture(2), tmp_path / "b.jpg")])


def test_import_threatexchange_style_csv(tmp_path):
    h1, h2 = _hashes(_picture(5), 95), _hashes(_picture(6), 95)
    csv = tmp_path / "shared.csv"
    csv.write_text(
        "id,pdq,quality,label\n"
        f"te-17,{h1.pdq},{h1.pdq_quality},flooded-subway.jpg\n"
        f"te-18,{h2.pdq},10,too-flat.jpg\n"  # low quality: never trusted
    )
    store = BankStore(tmp_path / "b.sqlite")
    assert store.import_csv("te", csv, "fake") == 2
    m = store.match(_hashes(_picture(5), 50))
    assert [(x.entry_id, x.via) for x in m] == [("te-17", "pdq")]
    assert store.match(_hashes(_picture(6), 50)) == []

    ph = tmp_path / "phash.csv"
    ph.write_text(f"phash,label\n{h2.phash},verified-photo\n")
    assert store.import_csv("checked", ph, "authentic") == 1
    m = store.match(_hashes(_picture(6), 50))
    assert [(x.bank, x.entry_id, x.verdict, x.via) for x in m] == [("checked", "1", "authentic", "phash")]

    bare = tmp_path / "bare.csv"
    bare.write_text(f"{h1.pdq}\n")
    assert store.import_csv("bare", bare, "fake") == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("pdq\nnot-a-hash\n")
    with pytest.raises(ValueError):
        store.import_csv("bad", bad, "fake")


def test_evidence_fake_and_allow_list(tmp_path):
    store = BankStore(tmp_path / "b.sqlite")
    store.add_images("afp-debunked", "fake", [_save(_picture(1), tmp_path / "flooded-subway.jpg")])
    store.add_images("verified", "authentic", [_save(_picture(2), tmp_path / "real.jpg")])
    [fake] = bank_evidence(store.match(_hashes(_picture(1))))
    assert fake.detector == "bank:afp-debunked" and fake.score > 0.9
    assert fake.data["verdict"] == "fake" and fake.data["suppress"] is False and fake.data["entry_id"] == "1"
    assert "'afp-debunked' entry 1 'flooded-subway.jpg'" in fake.detail and "distance" in fake.detail
    [auth] = bank_evidence(store.match(_hashes(_picture(2))))
    assert auth.detector == "bank:verified" and auth.score < 0.1 and auth.data["suppress"] is True
