"""The detect agent's acks (``streams.detect_worker.DetectStage``) on a real
Faust stream (the agent's test context: Faust's own ``Stream``,
``noack_take`` and acks), a real ``MicroBatcher`` and a real blob store.

Requests are acked once answered and never when a stop cuts the model short:
``take``, which the role used before, acked what it had handed out as the
agent's loop ended, so a worker stopped mid-batch committed requests it never
answered and their clusters waited for good."""

from __future__ import annotations

import asyncio
import io
import threading

from detectors.base import Evidence, EvidenceKind
from detectors.imagedata import ImageData
from detectors.models.batching import MicroBatcher
from detectors.models.detector import BatchDetector
from streams.blobstore import DirectoryBlobStore
from streams.detect_worker import DetectStage
from streams.records import ClusterOp, DetectRequest
from streams.settings import Settings
from tests.faust_agents import recording_agent, wait_for
from tests.support import picture


class GatedModel(BatchDetector):
    """A model whose forward pass waits for ``gate``: the stop lands while it runs."""

    name = "gated-test-model"
    kind = EvidenceKind.MODEL

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()

    def analyze(self, image: ImageData) -> list[Evidence]:
        self.started.set()
        self.gate.wait(30)
        return [Evidence(detector=self.name, score=0.9, detail="gated", kind=self.kind, sha256=image.sha256)]


def _blob(blobs: DirectoryBlobStore, seed: int) -> str:
    buf = io.BytesIO()
    picture(seed, (64, 48)).save(buf, format="PNG")
    return blobs.put(buf.getvalue())


def _stage(tmp_path, model: GatedModel, sent: list[bytes]) -> tuple[DetectStage, DirectoryBlobStore]:
    settings = Settings(data_dir=tmp_path / "data", detect={"max_batch": 2, "max_wait_ms": 10})
    blobs = DirectoryBlobStore(tmp_path / "data" / "blobs")
    batcher = MicroBatcher(model, 2, 10)

    async def batchers() -> list:
        return [batcher]

    async def send_op(value: bytes) -> None:
        sent.append(value)

    return DetectStage(settings, batchers, blobs.get, send_op), blobs


def test_requests_are_answered_once_per_cluster_then_acked(tmp_path):
    model, sent, acked = GatedModel(), [], []
    model.gate.set()
    stage, blobs = _stage(tmp_path, model, sent)
    a, b = _blob(blobs, 1), _blob(blobs, 2)
    # c1 asks twice (its better copy b joined): one answer, for the last request
    requests = [DetectRequest(cluster_id="c1", sha256=a).dumps(), DetectRequest(cluster_id="c2", sha256=a).dumps(),
                DetectRequest(cluster_id="c1", sha256=b).dumps()]

    async def run() -> None:
        async with recording_agent("detect-stage-test", stage.run, acked).test_context() as ctx:
            for raw in requests:
                await ctx.put(raw)
            await wait_for(lambda: len(acked) == 3)

    asyncio.run(run())
    assert sorted(acked) == sorted(requests)
    answers = [ClusterOp.loads(v).detection for v in sent]
    assert sorted((r.cluster_id, r.sha256) for r in answers) == sorted([("c1", b), ("c2", a)])
    assert [(r.error, [e.score for e in r.evidence]) for r in answers] == [(None, [0.9])] * 2


def test_a_stop_while_the_model_runs_acks_nothing(tmp_path):
    model, sent, acked = GatedModel(), [], []
    stage, blobs = _stage(tmp_path, model, sent)
    requests = [DetectRequest(cluster_id=f"c{i}", sha256=_blob(blobs, i)).dumps() for i in range(2)]

    async def run() -> None:
        try:
            async with recording_agent("detect-stage-test", stage.run, acked).test_context() as ctx:
                for raw in requests:
                    await ctx.put(raw)
                await wait_for(model.started.is_set)
                assert acked == []
            # leaving the context stops the agent while the forward pass runs
        finally:
            model.gate.set()

    asyncio.run(run())
    assert acked == [], "requests a stop left unanswered were acked: their clusters would wait for good"
    assert sent == []
