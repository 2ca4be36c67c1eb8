"""The ``detect`` worker role: learned models, once per new cluster.

A separate Faust app id, hence its own consumer group, so GPU workers scale
independently of the CPU pipeline. Requests carry only a sha256; the image
comes from the blob store. Requests are taken in batches (up to
``TAKE_BATCHES`` x ``detect.max_batch`` within ``detect.max_wait_ms``) and
coalesced before any model runs: of several requests for one cluster only the
last is answered (a cluster waits for one result, and the last request names
its best copy), and a picture requested by several clusters is analysed once.
The micro-batcher then hands the model batches of ``detect.max_batch``; each
answer is sent as soon as its picture is done.

A request a newer deepwatch wrote at a ``schema_version`` this one does not
know (``records.NewerSchema``) holds its batch unacked, with one critical
line (``streams.held_records``), until this worker stops or the partition moves: an
upgraded worker answers it. Dropped like an unreadable one, its cluster
waited for a model result for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable

import faust

from detectors.imagedata import DecodeLimits, ImageData
from streams import metrics
from streams.faust_app import faust_app
from streams.priority import renice_threads
from streams.blobstore import DirectoryBlobStore, blob_dir
from streams.held_records import hold_newer, owned
from streams.records import ClusterOp, DetectionResult, DetectRequest, NewerSchema
from streams.settings import Settings

log = logging.getLogger(__name__)

TAKE_BATCHES = 8  # requests taken at once: this many model batches (``detect.max_batch``)
# How long a stopping detect role waits for a model batch still in flight,
# whose answers have nowhere to go by then: the grace Faust's worker gives
# leftover tasks (``streams.faust_tuning.PromptWorker``), not more.
CLOSE_WAIT_S = 0.2


def build_detect_app(settings: Settings, broker_url: str, nice_after_load: int | None = None) -> faust.App:
    """The detect role's app; its models load in a thread from now on.
    ``nice_after_load``: lower the whole process to this niceness once they
    are loaded (local workers: the load itself then runs at normal priority)."""
    app = faust_app(f"{settings.app_id}-detect", settings, broker_url)
    t = settings.topic
    requests = app.topic(t("detect-requests"), value_serializer="raw", key_serializer="raw")
    ops = app.topic(t("cluster-ops"), value_serializer="raw", key_serializer="raw", partitions=1)
    blobs = DirectoryBlobStore(blob_dir(settings.data_dir))

    def load_batchers() -> list:
        started = time.perf_counter()
        try:
            batchers = _load_batchers()
        except Exception as e:  # a model named in detect.models that is missing, or a head that does not load
            _fatal(f"the detect role cannot load detect.models {list(settings.detect.models)}: {e}")
        log.info("models loaded", extra={"seconds": round(time.perf_counter() - started, 3),
                                         "models": list(settings.detect.models)})
        from streams.worker import settle_heap

        settle_heap()  # the models too are start-up: frozen once they are whole
        if nice_after_load is not None:
            renice_threads(os.getpid(), nice_after_load)
        return batchers

    def _load_batchers() -> list:
        from detectors.models import load_detector
        from detectors.models.batching import MicroBatcher
        from detectors.models.vendors import VENDORS, enabled_vendors

        cfg = settings.detect
        learned = [n for n in cfg.models if n not in VENDORS]
        # A vendor plugin whose API key is not in the environment is skipped
        # (logged by enabled_vendors), not a startup failure.
        vendors = enabled_vendors([n for n in cfg.models if n in VENDORS])
        return [
            MicroBatcher(
                load_detector(name, model_dir=settings.model_dir, device=cfg.device, head=cfg.pixel_head, amp=cfg.amp,
                              vendor_urls=cfg.vendor_urls),
                cfg.max_batch, cfg.max_wait_ms,
            )
            for name in [*learned, *vendors]
        ]

    # The load starts now, in a thread, while Faust connects and joins its
    # group (a JoinGroup alone is held for seconds by the embedded broker):
    # the models are ready sooner, and once per process, not once per actor.
    pool = ThreadPoolExecutor(1, thread_name_prefix="detect-load")
    loading = pool.submit(load_batchers)
    pool.shutdown(wait=False)  # the load still runs; the thread ends with it

    async def shared_batchers() -> list:
        return await asyncio.wrap_future(loading)

    stage = DetectStage(settings, shared_batchers, blobs.get,
                        lambda value: ops.send(key=b"ops", value=value))

    @app.agent(requests)
    async def detect(stream):
        try:
            await stage.run(stream)
        finally:
            # Only when the app stops: an actor that crashed is restarted by its
            # supervisor into the same models, which must still take pictures.
            if app.should_stop:
                await stage.close()

    return app


class DetectStage:
    """The detect agent: requests taken in batches, answered (``answer``),
    and acked once answered; its models closed as the app stops (``close``).
    ``batchers``: the loaded models, awaited as the agent starts (they load
    in a thread while Faust starts); ``read``: a picture's bytes by sha256
    (the blob store); ``send_op``: hands one ``ClusterOp`` to the cluster
    stage."""

    def __init__(self, settings: Settings, batchers: Callable[[], Awaitable[list]], read: Callable[[str], bytes],
                 send_op: Callable[[bytes], Awaitable[object]]):
        self.cfg = settings.detect
        self.limits = settings.decode_limits()  # the decode budget the models' prepares share
        self.batchers = batchers
        self.read = read
        self.send_op = send_op
        self.loaded: list | None = None  # the models once ``run`` has them

    async def run(self, stream) -> None:
        batchers = self.loaded = await self.batchers()
        cfg = self.cfg
        # What ran, not what was configured: a vendor whose API key is unset was never loaded
        # (``enabled_vendors``). Named as their evidence names them (``model:<name>``, ``vendor:<name>``).
        ran = [b.detector.name for b in batchers]
        # Up to several model batches of requests at a time: a backlog (a
        # burst of new clusters) then coalesces a cluster's first request
        # with the one its better copy sent moments later (measured on the
        # replay bench's feed: 18 of ~230 requests against 5 at one model
        # batch), and every answer still leaves as soon as its picture is done.
        # Acked once answered (``noack_take``): ``take`` acks what it handed
        # out however the loop ends, so a worker stopped mid-batch could commit
        # requests it never answered (as the analyze agent did with events),
        # and their clusters would wait for good.
        async for events in stream.noack_take(max(1, cfg.max_batch) * TAKE_BATCHES,
                                              within=max(cfg.max_wait_ms, 1.0) / 1000):
            raws = [e.value for e in events]
            started = time.perf_counter()

            async def send(req: DetectRequest, evidence: list, error: str | None) -> None:
                result = DetectionResult(cluster_id=req.cluster_id, sha256=req.sha256, evidence=evidence,
                                         models=list(ran), error=error)
                await self.send_op(ClusterOp(kind="detection", detection=result).dumps())

            try:
                answered = await answer(
                    raws, lambda sha: analyse_picture(sha, lambda: self.read(sha), batchers, self.limits), send)
            except NewerSchema as e:  # ``coalesce`` raises it before any request is answered
                await hold_newer("detect requests", events[0].message, {"requests": len(events)}, e,
                                 lambda: owned(stream, events))
                for ev in events:  # the partitions moved: acking commits nothing
                    await stream.ack(ev)
                continue
            # Seconds per answer, as every other stage counts per event: per
            # take, a CPU worker's backlog of 64 pictures read as a 10-s stage
            # and kept DeepwatchStageLatencyHigh firing (its lag shows the backlog).
            per_answer = (time.perf_counter() - started) / max(1, answered)
            for _ in range(answered):
                metrics.STAGE_SECONDS.labels("detect").observe(per_answer)
            metrics.EVENTS.labels("detect", "coalesced").inc(len(raws) - answered)
            for e in events:
                await stream.ack(e)

    async def close(self) -> None:
        """Close the models' batchers as the app stops (``MicroBatcher.close``:
        its collector and its thread pools). The collector is a loop that ends
        only when cancelled: left to the worker's leftover-task wait, it held
        every stop of this role for that wait's whole 0.2 s (measured from the
        worker logs; a replay waits for its slowest worker's stop). A batch
        still in flight gets ``CLOSE_WAIT_S``; then its wait is cancelled and
        the pools shut, and a forward already running ends in its own thread.
        Models still loading are left to end with the process."""
        if not self.loaded:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(b.close() for b in self.loaded), return_exceptions=True),
                                   CLOSE_WAIT_S)


def _fatal(message: str) -> None:
    """A configuration the role cannot run with: one ``error:`` line in its log
    and exit 2, at once (from the load thread, whether or not the broker is up)
    instead of Faust restarting the agent into the same failure (it did, every
    few milliseconds). Nothing was consumed yet: nothing to commit."""
    log.critical(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


async def answer(raws: list[bytes], analyse: Callable[[str], Awaitable[tuple[list, str | None]]],
                 send: Callable[[DetectRequest, list, str | None], Awaitable[None]]) -> int:
    """Answer a batch of requests: coalesced (``coalesce``), each picture
    analysed once, and each answer sent, in the order of the requests, as
    soon as its picture is done. Returns the answers sent."""
    reqs = coalesce(raws)
    found = {sha: asyncio.ensure_future(analyse(sha)) for sha in dict.fromkeys(r.sha256 for r in reqs)}
    try:
        for req in reqs:
            await send(req, *await found[req.sha256])
    finally:  # a worker stopping mid-batch leaves no analysis running behind it
        for task in found.values():
            task.cancel()
    return len(reqs)


def _verified(sha256: str, data: bytes, limits: DecodeLimits | None = None) -> ImageData:
    """The picture ``sha256`` from its blob's bytes, which must still be it: a blob
    damaged on disk that still decodes would be scored as somebody else's pixels."""
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise ValueError(f"blob {sha256} is corrupt on disk: its bytes hash to {found}")
    return ImageData(data, sha256=sha256, limits=limits)


async def analyse_picture(sha256: str, read: Callable[[], bytes], batchers: list,
                          limits: DecodeLimits | None = None) -> tuple[list, str | None]:
    """Evidence of every model for one picture, and an error line (None when all answered).
    A model that fails costs only its own evidence, not that of the others; a picture that
    cannot be read or decoded is an error for all. Reported to the cluster either way, so
    it stops waiting; its score simply lacks that model's evidence."""
    try:
        image = await asyncio.to_thread(lambda: _verified(sha256, read(), limits))
    except Exception as e:
        log.exception("model detection failed", extra={"sha256": sha256})
        return [], f"{type(e).__name__}: {e}"
    results = await asyncio.gather(*(b.submit(image) for b in batchers), return_exceptions=True)
    evidence, errors = [], []
    for b, found in zip(batchers, results):
        if isinstance(found, BaseException):
            if not isinstance(found, Exception):  # cancelled: the worker is stopping
                raise found
            log.error("model detection failed", exc_info=found,
                      extra={"sha256": sha256, "model": getattr(b.detector, "name", "?")})
            errors.append(f"{getattr(b.detector, 'name', '?')}: {type(found).__name__}: {found}")
            continue
        evidence.extend(e.model_copy(update={"sha256": sha256}) for e in found)
    return evidence, ("; ".join(errors) or None)


def coalesce(raws: list[bytes]) -> list[DetectRequest]:
    """The requests of a batch worth answering: the last one per cluster, in
    the order of those last requests. A cluster waits for one result
    (``models_pending`` is a flag), and its last request names its best copy.
    Unreadable requests are logged and dropped: nothing waits for them. A
    newer deepwatch's request raises ``NewerSchema`` (module docstring)."""
    latest: dict[str, DetectRequest] = {}
    for raw in raws:
        try:
            req = DetectRequest.loads(raw)
        except NewerSchema:
            raise
        except Exception:
            log.exception("unreadable detect request", extra={"excerpt": bytes(raw[:200]).decode("utf-8", "replace")})
            continue
        latest.pop(req.cluster_id, None)  # re-inserted below: answers keep the order of the last requests
        latest[req.cluster_id] = req
    return list(latest.values())

