"""The ``detect`` worker role: learned models, once per new cluster.

A separate Faust app id, hence its own consumer group, so GPU workers scale
independently of the CPU pipeline. Requests carry only a sha256; the image
comes from the blob store. Concurrent requests are grouped by a micro-batcher
so the GPU sees full batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import faust

from detectors.imagedata import ImageData
from streams import metrics
from streams.app import _faust_app
from streams.blobstore import DirectoryBlobStore
from streams.records import ClusterOp, DetectionResult, DetectRequest
from streams.settings import Settings

log = logging.getLogger(__name__)


def build_detect_app(settings: Settings, broker_url: str) -> faust.App:
    app = _faust_app(f"{settings.app_id}-detect", settings, broker_url)
    t = settings.topic
    requests = app.topic(t("detect-requests"), value_serializer="raw", key_serializer="raw")
    ops = app.topic(t("cluster-ops"), value_serializer="raw", key_serializer="raw", partitions=1)
    blobs = DirectoryBlobStore(Path(settings.data_dir) / "blobs")
    loading: list[asyncio.Future] = []

    def load_batchers() -> list:
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
                load_detector(name, model_dir=settings.model_dir, device=cfg.device, head=cfg.pixel_head),
                cfg.max_batch, cfg.max_wait_ms,
            )
            for name in [*learned, *vendors]
        ]

    async def shared_batchers() -> list:
        # Every actor awaits the same load: the models are loaded once per
        # process, not once per actor (no await between the check and the append).
        if not loading:
            loading.append(asyncio.ensure_future(asyncio.to_thread(load_batchers)))
        return await loading[0]

    # Concurrency lets several requests wait in the micro-batcher at once.
    @app.agent(requests, concurrency=max(1, settings.detect.max_batch))
    async def detect(stream):
        batchers = await shared_batchers()
        async for raw in stream:
            req = DetectRequest.loads(raw)
            started = time.perf_counter()
            try:
                image = await asyncio.to_thread(lambda: ImageData(blobs.get(req.sha256)))
                results = await asyncio.gather(*(b.submit(image) for b in batchers))
                evidence = [e.model_copy(update={"sha256": req.sha256}) for found in results for e in found]
                result = DetectionResult(
                    cluster_id=req.cluster_id, sha256=req.sha256, evidence=evidence,
                    models=list(settings.detect.models),
                )
            except Exception as e:
                # Report the failure to the cluster so it stops waiting; its
                # score simply lacks model evidence.
                log.exception("model detection failed", extra={"cluster_id": req.cluster_id})
                result = DetectionResult(
                    cluster_id=req.cluster_id, sha256=req.sha256, evidence=[],
                    models=list(settings.detect.models), error=f"{type(e).__name__}: {e}",
                )
            metrics.STAGE_SECONDS.labels("detect").observe(time.perf_counter() - started)
            await ops.send(key=b"ops", value=ClusterOp(kind="detection", detection=result).dumps())

    return app
