"""MicroBatcher groups concurrent submissions; device selection falls back to CPU."""

from __future__ import annotations

import asyncio
import io
import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image

from detectors.imagedata import ImageData
from detectors.models import MicroBatcher, ModelDetector, select_device
from detectors.models.checkpoint import InputSpec, ModelCard
from detectors.models.nets import SmallCNN


def _image(seed: int, fmt: str = "PNG") -> ImageData:
    arr = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return ImageData(buf.getvalue())


class CountingDetector(ModelDetector):
    def __init__(self) -> None:
        card = ModelCard(name="count", arch="small-cnn", input=InputSpec(size=32))
        super().__init__(card, SmallCNN(width=4), torch.device("cpu"))
        self.batch_sizes: list[int] = []

    def infer(self, batch: torch.Tensor) -> np.ndarray:
        self.batch_sizes.append(batch.shape[0])
        return super().infer(batch)


def test_concurrent_submits_become_one_forward() -> None:
    det = CountingDetector()

    async def main() -> list[list]:
        async with MicroBatcher(det, max_batch=8, max_wait_ms=300) as mb:
            return await asyncio.gather(*(mb.submit(_image(i)) for i in range(5)))

    results = asyncio.run(main())
    assert det.batch_sizes == [5]
    assert all(len(r) == 1 and r[0].detector == "model:count" for r in results)
    # each submitter gets the evidence for its own image
    assert [r[0].sha256 for r in results] == [_image(i).sha256 for i in range(5)]


def test_max_batch_splits() -> None:
    det = CountingDetector()

    async def main() -> None:
        async with MicroBatcher(det, max_batch=4, max_wait_ms=300) as mb:
            await asyncio.gather(*(mb.submit(_image(i)) for i in range(10)))

    asyncio.run(main())
    assert sorted(det.batch_sizes, reverse=True) == [4, 4, 2]


def test_max_wait_honoured() -> None:
    det = CountingDetector()

    async def main() -> float:
        async with MicroBatcher(det, max_batch=64, max_wait_ms=50) as mb:
            await mb.submit(_image(0))  # warm-up (thread pools, first forward)
            t0 = time.monotonic()
            await mb.submit(_image(1))
            return time.monotonic() - t0

    elapsed = asyncio.run(main())
    assert 0.045 <= elapsed < 1.0, elapsed  # waited for company, but not for a full batch
    assert det.batch_sizes == [1, 1]


def test_bad_image_fails_only_its_submitter() -> None:
    det = CountingDetector()
    good = _image(1)
    bad = ImageData(_image(2).data[:200])  # header intact, pixel data truncated

    async def main() -> list:
        async with MicroBatcher(det, max_batch=8, max_wait_ms=100) as mb:
            return await asyncio.gather(mb.submit(good), mb.submit(bad), return_exceptions=True)

    ok, failed = asyncio.run(main())
    assert isinstance(ok, list) and ok[0].sha256 == good.sha256
    assert isinstance(failed, Exception)
    assert det.batch_sizes == [1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_request_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="detectors.models.device"):
        assert select_device("cuda") == torch.device("cpu")
        assert select_device("cuda:1") == torch.device("cpu")
    assert "CUDA is not available" in caplog.text
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type in {"cpu", "mps"}
    assert select_device("tpu") == torch.device("cpu")


def test_a_backlog_holds_prepared_pixels_for_few_batches_and_still_fills_them() -> None:
    """However deep the queue, only one batch per forward plus the one being
    prepared hold decoded pixels; the rest wait as bytes, and batches that
    waited are still filled to max_batch."""

    class Slow(CountingDetector):
        live = peak = 0

        def prepare(self, image):
            Slow.live += 1
            Slow.peak = max(Slow.peak, Slow.live)
            return super().prepare(image)

        def infer(self, batch):
            time.sleep(0.05)
            out = super().infer(batch)
            Slow.live -= batch.shape[0]
            return out

    det = Slow()

    async def main() -> None:
        async with MicroBatcher(det, max_batch=4, max_wait_ms=20) as mb:
            await asyncio.gather(*(mb.submit(_image(i)) for i in range(20)))

    asyncio.run(main())
    assert det.concurrent_forwards == 1
    assert Slow.peak <= 2 * 4  # (forwards + 1) batches of 4
    assert det.batch_sizes == [4] * 5


def test_prepares_share_the_decode_budget_and_keep_no_full_size_pixels() -> None:
    """A take of the detect role prepared every picture at once, each holding
    its full-size decode until its batch was done: 12 pictures of 8000x8000
    held 2.8 GB. Now each decode waits for the process's decode budget, and
    its pixels go once the model input is cut."""
    from detectors.imagedata import DecodeLimits, process_budget

    limits = DecodeLimits(max_decode_bytes=40 * 40 * 4 * 3 // 2)  # room for one 40x40 picture, not two

    class Watching(CountingDetector):
        live = peak = 0

        def prepare(self, image):
            Watching.live += 1
            Watching.peak = max(Watching.peak, Watching.live)
            time.sleep(0.02)  # two prep threads: the second would be inside now
            try:
                return super().prepare(image)
            finally:
                Watching.live -= 1

    det = Watching()
    images = [ImageData(_image(i).data, limits=limits) for i in range(6)]

    async def main() -> None:
        async with MicroBatcher(det, max_batch=8, max_wait_ms=200, prep_workers=2) as mb:
            await asyncio.gather(*(mb.submit(im) for im in images))

    asyncio.run(main())
    assert det.batch_sizes == [6] and Watching.peak == 1
    assert all("rgb" not in im.__dict__ and "_thumbs" not in im.__dict__ for im in images)
    assert process_budget(limits.max_decode_bytes)._used == 0


class FlatFails(CountingDetector):
    """A model that cannot take a one-colour picture: ``mode`` says how it fails."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def infer(self, batch: torch.Tensor) -> np.ndarray:
        flat = batch.flatten(2).std(2).amax(1) == 0  # one colour
        out = super().infer(batch)
        if self.mode == "raise" and bool(flat.any()):
            raise RuntimeError("cannot take a flat picture")
        if self.mode != "raise":
            out[flat.numpy()] = float(self.mode)  # "nan", "inf"
        return out


def _flat() -> ImageData:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (90, 90, 90)).save(buf, format="PNG")
    return ImageData(buf.getvalue())


def _score_with_one_flat(det: CountingDetector) -> tuple[list, object]:
    async def main() -> list:
        async with MicroBatcher(det, max_batch=8, max_wait_ms=200) as mb:
            return await asyncio.gather(*(mb.submit(im) for im in [_image(1), _flat(), _image(2), _image(3)]),
                                        return_exceptions=True)

    results = asyncio.run(main())
    return [results[0], *results[2:]], results[1]


def test_a_picture_the_model_cannot_take_fails_alone_not_its_whole_batch() -> None:
    # was: the batch's forward raised and every picture in it got that error
    det = FlatFails("raise")
    good, flat = _score_with_one_flat(det)
    assert isinstance(flat, RuntimeError)
    assert [r[0].sha256 for r in good] == [_image(i).sha256 for i in (1, 2, 3)]
    assert det.batch_sizes == [4, 1, 1, 1, 1]  # tried together first, then one by one


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_a_non_finite_logit_is_an_error_not_a_confident_real(bad: str) -> None:
    # was: NaN became score 0.0 ("not AI", probability NaN) and reached fusion and the store
    good, flat = _score_with_one_flat(FlatFails(bad))
    assert isinstance(flat, ValueError) and "non-finite" in str(flat)
    assert [r[0].sha256 for r in good] == [_image(i).sha256 for i in (1, 2, 3)]
    assert all(np.isfinite(r[0].data["logit"]) for r in good)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_predict_batch_refuses_a_non_finite_logit_too(bad: str) -> None:
    # `deepwatch detect` and eval call predict_batch, not the micro-batcher: a NaN
    # logit was a confident "not AI" there. It raises (both retry image by image).
    det = FlatFails(bad)
    with pytest.raises(ValueError, match="non-finite"):
        det.predict_batch([_image(1), _flat()])
    assert [e.sha256 for e in det.predict_batch([_image(1)])] == [_image(1).sha256]


def test_one_picture_submitted_twice_is_one_call_and_one_evidence_each() -> None:
    # batch detectors without stages (vendors) answer by sha256: a second copy in
    # one batch gave each submitter both results, and a paid vendor two requests
    from detectors.base import Evidence, EvidenceKind
    from detectors.models.detector import BatchDetector

    class Vendor(BatchDetector):
        name = "a-vendor"
        calls: list[int] = []

        def analyze(self, image: ImageData) -> list[Evidence]:
            return [Evidence(detector=self.name, kind=EvidenceKind.VENDOR, score=0.9, detail="ai",
                             sha256=image.sha256)]

        def predict_batch(self, images: list[ImageData]) -> list[Evidence]:
            self.calls.append(len(images))
            return super().predict_batch(images)

    async def go() -> list[list[Evidence]]:
        mb = MicroBatcher(Vendor(), max_batch=4, max_wait_ms=50)
        try:
            return await asyncio.gather(mb.submit(_image(1)), mb.submit(_image(1)), mb.submit(_image(2)))
        finally:
            await mb.close()

    answers = asyncio.run(go())
    assert [len(a) for a in answers] == [1, 1, 1]
    assert answers[0][0].sha256 == answers[1][0].sha256 != answers[2][0].sha256
    assert Vendor.calls == [2]
