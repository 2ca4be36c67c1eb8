"""A detection result names the models that ran (``DetectStage``), not every
configured one: a vendor plugin whose API key is unset is skipped at load
(``enabled_vendors``) and never ran."""

from __future__ import annotations

import asyncio

from detectors.models.batching import MicroBatcher
from streams.blobstore import DirectoryBlobStore
from streams.detect_worker import DetectStage
from streams.records import ClusterOp, DetectRequest
from streams.settings import Settings
from tests.faust_agents import recording_agent, wait_for
from tests.test_detect_stage import GatedModel, _blob


def test_the_result_names_only_the_models_that_ran(tmp_path):
    settings = Settings(data_dir=tmp_path / "data",
                        detect={"max_batch": 2, "max_wait_ms": 10, "models": ["gated-test-model", "vendor:hive"]})
    blobs = DirectoryBlobStore(tmp_path / "data" / "blobs")
    model, sent, acked = GatedModel(), [], []
    model.gate.set()
    batcher = MicroBatcher(model, 2, 10)  # what loaded: the vendor without its key did not

    async def batchers() -> list:
        return [batcher]

    async def send_op(value: bytes) -> None:
        sent.append(value)

    stage = DetectStage(settings, batchers, blobs.get, send_op)
    raw = DetectRequest(cluster_id="c1", sha256=_blob(blobs, 1)).dumps()

    async def run() -> None:
        async with recording_agent("detect-result-models", stage.run, acked).test_context() as ctx:
            await ctx.put(raw)
            await wait_for(lambda: len(acked) == 1)

    asyncio.run(run())
    (op,) = [ClusterOp.loads(v) for v in sent]
    assert op.detection.models == ["gated-test-model"]
    assert op.detection.evidence and op.detection.error is None
