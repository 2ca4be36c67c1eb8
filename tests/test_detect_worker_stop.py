"""The detect role's stop: its models' batch collectors (loops that end
only when cancelled) are closed as the app stops, so the worker's
leftover-task wait (``streams.faust_tuning.PromptWorker._gather_all``) finds
nothing to wait for. Left to it, they held every stop of the role, and so
every replay's shutdown, for that wait's whole grace."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from contextlib import ExitStack

import pytest
from PIL import Image

from detectors.base import Evidence
from detectors.imagedata import ImageData
from detectors.models.batching import MicroBatcher
from detectors.models.detector import BatchDetector
from streams import runner
from streams.demo_feed import build_feed
from streams.detect_worker import DetectStage
from streams.ingest import produce_feed
from streams.settings import Settings
from streams.store import open_store
from tests.support import load_sitecustomize

# Loaded by the zygote of the test's replay (PYTHONPATH) before it forks the
# workers: each worker's log then says which tasks were left when it gathered
# its leftovers.
_REPORT_LEFTOVERS = """
import os, sys
if os.environ.get("DW_TEST_LEFTOVER_TASKS") and "streams.zygote" in " ".join(sys.orig_argv):
    import asyncio, json
    from streams import faust_tuning

    gather_all = faust_tuning.PromptWorker._gather_all

    def _gather_all(self):
        left = sorted(f"{t.get_name()}:{getattr(t.get_coro(), '__qualname__', '?')}"
                      for t in asyncio.all_tasks(loop=self.loop))
        print(json.dumps({"leftover_tasks": left}), flush=True)
        gather_all(self)

    faust_tuning.PromptWorker._gather_all = _gather_all
"""


def _leftovers(log: str) -> list[list[str]]:
    return [json.loads(line)["leftover_tasks"] for line in log.splitlines() if line.startswith('{"leftover_tasks"')]


@pytest.mark.slow
def test_a_detect_worker_that_ran_its_model_stops_with_no_task_left(tmp_path, monkeypatch):
    load_sitecustomize(tmp_path, monkeypatch, _REPORT_LEFTOVERS)
    monkeypatch.setenv("DW_TEST_LEFTOVER_TASKS", "1")
    feed, exp = build_feed(tmp_path / "feed", burst=4)
    settings = Settings(data_dir=tmp_path / "data")  # the packaged pixel model, as replay runs it
    settings.ingest.image_roots = [feed.parent.resolve()]
    with ExitStack() as stack:
        cluster = runner.start_cluster(settings, stack)
        assert cluster.zygote is not None, "the workers must be forked from the zygote that loaded the report"
        detect = cluster.start_worker("detect")
        pipeline = cluster.start_worker("pipeline")
        produced = produce_feed(feed, cluster.bootstrap, settings)
        assert runner.wait_until_processed(cluster, produced.offsets, timeout_s=240, models=True)
    # the model ran (its batch collector existed), and every cluster has its result
    clusters = open_store(settings.data_dir).clusters()
    assert len(clusters) == exp.distinct_pictures
    assert not any(c.models_pending for c in clusters)
    assert detect.proc.returncode == 0 and pipeline.proc.returncode == 0
    # one report per worker (the wrapper reached them), and nothing left in either
    assert _leftovers(pipeline.log_path.read_text(errors="replace")) == [[]]
    assert _leftovers(detect.log_path.read_text(errors="replace")) == [[]]


class _HeldModel(BatchDetector):
    """A model whose forward runs until the test lets it end."""

    name = "held"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def analyze(self, image) -> list[Evidence]:  # pragma: no cover - only predict_batch is called
        return []

    def predict_batch(self, images) -> list[Evidence]:
        self.entered.set()
        self.release.wait(10)
        self.finished.set()
        return []


def test_closing_the_stage_does_not_wait_for_a_forward_still_running():
    """Stopped mid-batch: the collector and the batch in flight are cancelled
    after ``CLOSE_WAIT_S`` instead of holding the stop until the forward ends
    (here it ends only once ``close`` has returned)."""
    model = _HeldModel()

    async def scenario() -> tuple[set[str], bool]:
        batcher = MicroBatcher(model, max_batch=1, max_wait_ms=1.0)

        async def loaded() -> list:
            return [batcher]

        stage = DetectStage(Settings(), loaded, lambda sha: b"", lambda value: asyncio.sleep(0))
        stage.loaded = await stage.batchers()
        png = io.BytesIO()
        Image.new("RGB", (8, 8)).save(png, "PNG")
        asking = asyncio.ensure_future(batcher.submit(ImageData(png.getvalue())))
        while not model.entered.is_set():
            await asyncio.sleep(0.01)
        asking.cancel()  # as the stopping agent cancels its analyses
        await stage.close()
        forward_ran_on = not model.finished.is_set()
        for pool in (batcher._prep_pool, batcher._infer_pool):  # shut although close's wait was cut short
            with pytest.raises(RuntimeError, match="after shutdown"):
                pool.submit(print)
        model.release.set()
        left = {t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        return left, forward_ran_on

    try:
        left, forward_ran_on = asyncio.run(scenario())
        assert forward_ran_on  # close returned before the forward it did not wait for
        assert left == set()  # neither the collector nor the batch in flight is left
    finally:
        model.release.set()
