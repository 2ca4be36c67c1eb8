"""Group concurrent per-cluster requests into one forward pass.

The detect worker handles clusters as independent async tasks; each wants one
image scored. A forward pass over 32 images costs barely more than over one on
a GPU, so submissions wait up to ``max_wait_ms`` for company (or until
``max_batch`` are queued) and go through together.

Threading: decode+transform (PIL, numpy: releases the GIL) runs on a small
pool so it overlaps with inference, each decode within the process's decode
memory budget and its full-size pixels dropped once the model input is cut; forward passes run on a dedicated pool,
never on the event loop. That pool has one thread (batches never contend for
a device or for a runtime that spreads one call over every core) unless the
detector's forward is single-threaded (``concurrent_forwards``): then one per
core, so a backlog of batches -- a replay's model tail -- uses every core
while a busy machine's other work still comes first for a niced worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from detectors.base import Evidence
from detectors.freed_memory import TRIM_AFTER_BYTES, release_freed_memory
from detectors.imagedata import ImageData, process_budget
from detectors.models.detector import BatchDetector, StagedDetector

log = logging.getLogger(__name__)


def _prepare(det: StagedDetector, image: ImageData) -> Any:
    """The model input of ``image``, decoded within the process's decode
    budget. A batch's pictures wait for their answers holding only their
    (small) model input: each held its full-size decode until the batch was
    done, 16 or more 8000x8000 pictures at once in a take of the detect role
    (2.8 GB with 12). With two staged models the picture is decoded once per
    model (each drops its decode when done), the price of the bound."""
    with process_budget(image.limits.max_decode_bytes).reserve(image.decode_cost):
        try:
            return det.prepare(image)
        finally:
            image.drop_decoded()
            if image.decode_cost >= TRIM_AFTER_BYTES:
                release_freed_memory()


@dataclass
class _Pending:
    image: ImageData
    future: asyncio.Future[list[Evidence]]
    queued_at: float = field(default_factory=time.monotonic)


class MicroBatcher:
    def __init__(
        self,
        detector: BatchDetector,
        max_batch: int = 16,
        max_wait_ms: float = 20.0,
        *,
        prep_workers: int | None = None,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.detector = detector
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self._prep_pool = ThreadPoolExecutor(
            max_workers=prep_workers or min(8, os.cpu_count() or 2), thread_name_prefix="dw-prep"
        )
        forwards = max(1, detector.concurrent_forwards if isinstance(detector, StagedDetector) else 1)
        self._infer_pool = ThreadPoolExecutor(max_workers=forwards, thread_name_prefix="dw-infer")
        # Batches in flight (prepared pixels held until their forward ends):
        # one per forward, plus the one being prepared. A backlog waits in the
        # queue as compressed bytes, so memory stays bounded however deep it is.
        self._slots = asyncio.Semaphore(forwards + 1)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.batches_run = 0  # for metrics and tests

    async def submit(self, image: ImageData) -> list[Evidence]:
        """Score one image; resolves when the batch it joined has run."""
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._collect(), name="microbatcher")
        fut: asyncio.Future[list[Evidence]] = loop.create_future()
        await self._queue.put(_Pending(image, fut))
        return await fut

    async def _collect(self) -> None:
        assert self._queue is not None
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            # Don't await the batch here: the next one can be collected and
            # preprocessed while this one is on the device.
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._inflight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _next_batch(self) -> list[_Pending]:
        assert self._queue is not None
        first = await self._queue.get()
        batch = [first]
        deadline = first.queued_at + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():  # a backlog fills the batch whatever the deadline
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            det = self.detector
            if isinstance(det, StagedDetector):
                # Per-image prepare so one corrupt image fails only its own submitter.
                prepared = await asyncio.gather(
                    *(loop.run_in_executor(self._prep_pool, _prepare, det, p.image) for p in batch),
                    return_exceptions=True,
                )
                ok = [(p, t) for p, t in zip(batch, prepared) if not isinstance(t, BaseException)]
                for p, t in zip(batch, prepared):
                    if isinstance(t, BaseException) and not p.future.done():
                        p.future.set_exception(t)
                if not ok:
                    return
                try:
                    logits = await loop.run_in_executor(self._infer_pool, self._forward, [t for _, t in ok])
                except Exception:
                    if len(ok) == 1:
                        raise
                    # One picture the model cannot take must not cost the others their
                    # results: each is run alone, and only the one(s) that fail again fail.
                    log.warning("batch of %d failed in %s; running its pictures one by one",
                                len(ok), det.name, exc_info=True)
                    await asyncio.gather(*(self._run_alone(p, t) for p, t in ok))
                    return
                self.batches_run += 1
                for (p, _), z in zip(ok, logits):
                    self._answer(p, float(z))
            else:
                # One picture submitted twice (two clusters asking at once) is one
                # call: results are matched back by sha256, so a second copy gave
                # each submitter both results, and a paid vendor two requests.
                unique = list({p.image.sha256: p.image for p in batch}.values())
                results = await loop.run_in_executor(self._infer_pool, det.predict_batch, unique)
                self.batches_run += 1
                by_sha: dict[str, list[Evidence]] = {}
                for ev in results:
                    by_sha.setdefault(ev.sha256 or "", []).append(ev)
                for p in batch:
                    if not p.future.done():
                        p.future.set_result(by_sha.get(p.image.sha256, []))
        except Exception as e:  # a failed batch must not leave submitters hanging
            log.exception("batch of %d failed in %s", len(batch), self.detector.name)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)

    def _forward(self, prepared: list) -> Any:
        """Stack and infer (on the inference pool: a stack of a full batch is tens of MB to copy)."""
        det = self.detector
        assert isinstance(det, StagedDetector)
        return det.infer(det.stack(prepared))

    async def _run_alone(self, p: _Pending, prepared: Any) -> None:
        try:
            logits = await asyncio.get_running_loop().run_in_executor(self._infer_pool, self._forward, [prepared])
        except Exception as e:
            log.exception("picture %s failed in %s", p.image.sha256, self.detector.name)
            if not p.future.done():
                p.future.set_exception(e)
            return
        self.batches_run += 1
        self._answer(p, float(logits[0]))

    def _answer(self, p: _Pending, logit: float) -> None:
        """One submitter's evidence. A logit that is not a finite number (a model that overflowed:
        fp16 on a GPU, a broken checkpoint) is that picture's error, never evidence: clamped, it
        read as a confident "not AI" (score 0.0, probability NaN). A picture whose evidence
        cannot be written fails alone."""
        if p.future.done():
            return
        try:
            if not math.isfinite(logit):
                raise ValueError(f"{self.detector.name} gave a non-finite logit ({logit}) for {p.image.sha256}")
            p.future.set_result([self.detector.to_evidence(p.image, logit)])  # type: ignore[attr-defined]
        except Exception as e:
            log.error("no evidence from %s for %s: %s", self.detector.name, p.image.sha256, e)
            p.future.set_exception(e)

    async def close(self) -> None:
        """Stop the collector, wait for the batches in flight, and shut the
        thread pools (queued work cancelled). Cancelled while it waits (a
        stopping worker's bound on it), the pools are still shut; a forward
        already running ends in its own thread."""
        try:
            if self._runner is not None:
                self._runner.cancel()
                try:
                    await self._runner
                except asyncio.CancelledError:
                    pass
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)
        finally:
            self._prep_pool.shutdown(wait=False, cancel_futures=True)
            self._infer_pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> "MicroBatcher":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
