"""BatchingClassifier: one model shared by threads and asyncio tasks, dynamic batching, isolation, backpressure.

A stalled input is a path to a named pipe (FIFO): reading it blocks until the test writes the PNG into it,
so "a slow request does not stall others" is checked without timing assumptions.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from iws_engine.batching import BatchingClassifier, BatcherClosed, QueueFull
from tests.conftest import XGBOOST_MODEL, require

N_DISTINCT = 24
# per_request: the cpu loader's load_item per request; per_batch: the path of the gpu/dali loaders (the loader's
# batches() over each formed batch), run here with the real cpu loader's batches()
DECODE_MODES = ["per_request", "per_batch"]


def _png(i: int) -> bytes:
    from iws_engine.export.synth import encode_png, render_vignette

    return encode_png(render_vignette(np.random.default_rng([11, i]), i % 2 == 0, 80, 96), "rgba16")


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return [_png(i) for i in range(N_DISTINCT)]


@pytest.fixture(scope="module")
def offline(pngs):
    """What offline `classify` says for each of `pngs` (the reference for every interleaving)."""
    from iws_engine import Classifier

    with Classifier() as clf:
        rows = list(clf.classify(pngs))
    assert all(r.ok for r in rows)
    return rows


def assert_matches(row, expected):
    assert row.ok, row.error
    assert abs(row.score - expected.score) <= 1e-6
    assert row.decision == expected.decision and row.threshold == expected.threshold
    assert row.model_id == expected.model_id


class StalledInput:
    """A FIFO whose reader blocks until `release(data)` writes the whole PNG into it. As a context manager it
    releases a failed test's reader (from a daemon thread), so that close() cannot wait for it forever."""

    def __init__(self, tmp_path: Path, name: str = "stalled.png"):
        self.path = tmp_path / name
        self.released = False
        os.mkfifo(self.path)

    def release(self, data: bytes) -> None:
        self.released = True
        with open(self.path, "wb") as f:  # opening for writing unblocks the reader's open()
            f.write(data)

    def __enter__(self) -> "StalledInput":
        return self

    def __exit__(self, *exc) -> None:
        if not self.released:
            threading.Thread(target=self.release, args=(b"released by the test's clean-up",), daemon=True).start()


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_threads_match_offline_and_batches_form(pngs, offline, decode):
    order = [i % N_DISTINCT for i in range(64)]
    random.Random(3).shuffle(order)
    results: dict[int, list] = {}
    with BatchingClassifier(max_batch_size=8, max_queue_delay_ms=20, decode=decode) as clf:
        assert clf.decode == decode
        def caller(k: int):
            mine = order[k::16]
            futures = [clf.submit(pngs[i]) for i in mine]  # many in flight per caller
            results[k] = list(zip(mine, (f.result() for f in futures)))

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(caller, range(16)))
        stats = clf.stats()
    rows = [pair for k in range(16) for pair in results[k]]
    assert len(rows) == 64
    for i, row in rows:
        assert_matches(row, offline[i])
    assert stats["requests"] == stats["completed"] == 64 and stats["errors"] == 0
    assert sum(k * v for k, v in stats["batch_sizes"].items()) == 64
    assert max(stats["batch_sizes"]) > 1 and stats["mean_batch_size"] > 1  # batches really formed
    assert max(stats["batch_sizes"]) <= 8
    assert stats["batches"] == sum(stats["batch_sizes"].values()) < 64
    assert stats["queue_depth"] == 0 and stats["in_flight"] == 0
    lat = stats["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]


def test_asyncio_tasks_and_threads_together(pngs, offline):
    with BatchingClassifier(max_batch_size=16, max_queue_delay_ms=10) as clf:
        async def many():
            order = [i % N_DISTINCT for i in range(48)]
            rows = await asyncio.gather(*(clf.classify_async(pngs[i]) for i in order))
            return list(zip(order, rows))

        thread_rows = []
        worker = threading.Thread(target=lambda: thread_rows.extend(
            (i, clf.submit(pngs[i]).result()) for i in range(N_DISTINCT)))
        worker.start()
        task_rows = asyncio.run(many())
        worker.join()
        # classify_many keeps input order
        many_rows = clf.classify_many([pngs[i] for i in reversed(range(N_DISTINCT))])
        stats = clf.stats()
    for i, row in task_rows + thread_rows:
        assert_matches(row, offline[i])
    for i, row in zip(reversed(range(N_DISTINCT)), many_rows):
        assert_matches(row, offline[i])
    assert stats["completed"] == 48 + 2 * N_DISTINCT and max(stats["batch_sizes"]) > 1


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_bad_inputs_get_their_own_error_rows(pngs, offline, tmp_path, decode):
    # the same rows, names and messages whichever way the inputs are decoded
    good = tmp_path / "good.png"
    good.write_bytes(pngs[3])
    inputs = [pngs[0], b"hello, I am text", pngs[1][:300], str(tmp_path / "missing.png"), good, tmp_path, pngs[2]]
    with BatchingClassifier(max_batch_size=4, decode=decode) as clf:
        rows = clf.classify_many(inputs[:5] + inputs[6:])
        dir_row = clf.submit(tmp_path, name="the-dir").result()
        stats = clf.stats()
    assert [r.ok for r in rows] == [True, False, False, False, True, True]
    assert_matches(rows[0], offline[0])
    assert_matches(rows[4], offline[3])
    assert_matches(rows[5], offline[2])
    assert rows[1].error.startswith("<bytes #1>: not a PNG file")
    assert rows[2].path == "<bytes #2>" and "<bytes #2>" in rows[2].error
    assert "missing.png" in rows[3].error and "cannot read file" in rows[3].error
    assert rows[4].path == str(good)
    assert dir_row.path == "the-dir" and dir_row.error == "the-dir: is a directory, not a PNG file"
    assert stats["errors"] == 4 and stats["completed"] == 7
    assert rows[1].score is None and rows[1].decision is None


def test_a_stalled_input_does_not_stall_the_others(pngs, offline, tmp_path):
    # (the stalled input is released, if the test failed, before close() waits for it)
    with BatchingClassifier(max_batch_size=4, max_queue_delay_ms=1, workers=2) as clf, \
            StalledInput(tmp_path) as stalled:
        slow = clf.submit(stalled.path)
        others = [clf.submit(pngs[i]) for i in range(12)]
        for i, f in enumerate(others):  # all answered while the stalled read still blocks a decoder thread
            assert_matches(f.result(timeout=60), offline[i])
        assert not slow.done()
        assert clf.stats()["in_flight"] == 1
        stalled.release(pngs[5])
        assert_matches(slow.result(timeout=60), offline[5])
        assert slow.result().path == str(stalled.path)


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_close_while_busy_loses_nothing_accepted(pngs, offline, decode):
    clf = BatchingClassifier(max_batch_size=8, max_queue_delay_ms=5, decode=decode)
    accepted, refused = [], []

    def submitter(k: int):
        j = 0
        while True:  # until close() refuses
            i = (k * 7 + j) % N_DISTINCT
            try:
                accepted.append((i, clf.submit(pngs[i])))
            except BatcherClosed:
                refused.append(k)
                return
            j += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    while len(accepted) < 40:
        time.sleep(0.001)
    clf.close()  # while callers are submitting and requests are queued, decoding and inferring
    for t in threads:
        t.join()
    assert sorted(refused) == list(range(8))
    for i, f in accepted:
        assert f.done()  # close() returned only after every accepted request was answered
        assert_matches(f.result(), offline[i])
    stats = clf.stats()
    assert stats["requests"] == stats["completed"] == len(accepted)
    with pytest.raises(BatcherClosed):
        clf.submit(pngs[0])
    clf.close()  # idempotent


def test_queue_full_and_deadlines(pngs, offline, tmp_path):
    # one decode slot, held by the stalled input: the dispatcher waits on the next request, the queue fills
    with BatchingClassifier(max_batch_size=4, max_queue=2, max_inflight=1, workers=1) as clf, \
            StalledInput(tmp_path) as stalled:
        slow = clf.submit(stalled.path)
        waiting_for_slot = clf.submit(pngs[0], deadline=1.0)  # taken by the dispatcher, needs the slot
        deadline = time.monotonic() + 10
        while clf.stats()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.005)
        queued = [clf.submit(pngs[1]), clf.submit(pngs[2], deadline=1.0)]
        assert clf.stats()["queue_depth"] == 2
        with pytest.raises(QueueFull):
            clf.submit(pngs[3], block=False)
        t0 = time.monotonic()
        with pytest.raises(QueueFull):
            clf.submit(pngs[3], timeout=0.1)
        assert time.monotonic() - t0 >= 0.09
        # both deadlines pass while the stalled input still holds the slot: they are answered all the same
        for f in (waiting_for_slot, queued[1]):
            row = f.result(timeout=30)
            assert not row.ok and "timed out: not started within its deadline of 1000 ms" in row.error
        assert not slow.done() and not queued[0].done()
        assert clf.stats()["queue_depth"] == 0  # queued[0] now waits with the dispatcher for the slot
        stalled.release(pngs[4])
        assert_matches(slow.result(timeout=60), offline[4])
        assert_matches(queued[0].result(timeout=60), offline[1])
        # a blocked submitter gets in once there is room
        assert_matches(clf.submit(pngs[3], timeout=30).result(timeout=60), offline[3])
        stats = clf.stats()
    assert stats["timeouts"] == 2 and stats["errors"] == 2 and stats["completed"] == 5


def test_misuse_raises_and_options_are_checked(pngs):
    with pytest.raises(ValueError, match="unknown pipeline"):
        BatchingClassifier(pipeline="resnet")
    with pytest.raises(ValueError, match="unknown decode mode 'per_image'"):
        BatchingClassifier(decode="per_image")
    with BatchingClassifier() as clf:
        assert clf.decode == "per_request"  # the cpu loader's default: decode overlaps inference
        with pytest.raises(TypeError, match="PNG bytes or a path"):
            clf.submit(42)
        assert clf.max_batch_size == clf.classifier.batch_size == 16
        with pytest.raises(ValueError, match="not both"):
            BatchingClassifier(classifier=clf.classifier, backend="torch")
    with pytest.raises(BatcherClosed):
        clf.submit(pngs[0])


def test_wraps_a_given_classifier_without_closing_it(pngs, offline):
    from iws_engine import Classifier

    with Classifier(batch_size=4) as inner:
        with BatchingClassifier(classifier=inner) as clf:
            assert clf.max_batch_size == 4
            assert_matches(clf.submit(pngs[7]).result(), offline[7])
        assert list(inner.classify([pngs[7]]))[0].score == pytest.approx(offline[7].score, abs=1e-6)


def test_pipeline_a_batches_too(tiny_eva02_weights):
    pytest.importorskip("xgboost")
    from iws_engine.pipeline_a import EvaXgbClassifier

    xgb = require(XGBOOST_MODEL)
    from iws_engine.export.synth import encode_png, render_vignette

    blobs = [encode_png(render_vignette(np.random.default_rng([5, i]), i % 2 == 0, 60, 64), "rgb8") for i in range(6)]
    blobs[2] = b"not a png"
    with EvaXgbClassifier(xgb, tiny_eva02_weights, eva_config="tiny") as clf:
        expected = list(clf.classify(blobs))
    with BatchingClassifier(tiny_eva02_weights, pipeline="eva02xgb", xgboost_model=xgb, eva_config="tiny",
                            max_queue_delay_ms=50) as clf:
        with ThreadPoolExecutor(6) as pool:
            rows = list(pool.map(lambda b: clf.submit(b).result(), blobs))
        stats = clf.stats()
    for row, exp in zip(rows, expected):
        assert row.ok == exp.ok
        if exp.ok:
            assert abs(row.score - exp.score) <= 1e-6 and row.decision == exp.decision
    assert "not a PNG" in rows[2].error and stats["errors"] == 1


def test_per_batch_a_slow_input_delays_its_batch_only_and_deadlines_hold(pngs, offline, tmp_path):
    # per batch, decoding is part of the batch: a stalled read holds the batch it is in (and the inference
    # thread), the requests behind it wait and are answered afterwards, by their deadline rules
    with BatchingClassifier(max_batch_size=1, max_queue_delay_ms=1, decode="per_batch") as clf, \
            StalledInput(tmp_path) as stalled:
        slow = clf.submit(stalled.path)  # first in, so the first batch (of one): its decode blocks on the FIFO
        late = clf.submit(pngs[0], deadline=0.2)
        patient = clf.submit(pngs[1])
        time.sleep(0.4)  # late's deadline passes while the stalled batch decodes
        assert not slow.done() and not patient.done()
        stalled.release(pngs[2])
        assert_matches(slow.result(timeout=60), offline[2])
        row = late.result(timeout=60)
        assert not row.ok and "timed out: not started within its deadline of 200 ms" in row.error
        assert_matches(patient.result(timeout=60), offline[1])
        stats = clf.stats()
    assert stats["timeouts"] == 1 and stats["completed"] == 3 and stats["batch_sizes"] == {1: 2}


def _gpu_loader_missing() -> str | None:
    """Why the GPU loader cannot run here (None: it can)."""
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        return f"the GPU loader needs CuPy ({e})"
    try:
        from nvidia import nvcomp  # noqa: F401
    except ImportError as e:
        return f"the GPU loader needs nvCOMP ({e})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"the GPU loader needs a CUDA device, and CuPy finds none ({type(e).__name__}: {e})"
    return None if count else "the GPU loader needs a CUDA device, and CuPy finds none"


def test_a_device_loader_that_cannot_run_here_says_why():
    from iws_engine.loaders.gpu import LoaderError

    if _gpu_loader_missing() is None:
        pytest.skip("the GPU loader runs here (its batching is test_gpu_loader_batches_per_batch)")
    with pytest.raises(LoaderError, match="the GPU loader needs"):
        BatchingClassifier(loader="gpu")


@pytest.mark.gpu
def test_gpu_loader_batches_per_batch(pngs, offline):
    reason = _gpu_loader_missing()
    if reason:
        pytest.skip(reason)
    with pytest.raises(ValueError, match="decode='per_request' needs a loader that decodes one input at a time"):
        BatchingClassifier(loader="gpu", decode="per_request")
    with BatchingClassifier(loader="gpu", max_batch_size=8, max_queue_delay_ms=20) as clf:
        assert clf.decode == "per_batch"
        with ThreadPoolExecutor(16) as pool:
            futures = list(pool.map(clf.submit, [pngs[i % N_DISTINCT] for i in range(48)] + [b"not a png"]))
        rows = [f.result(timeout=120) for f in futures]
        stats = clf.stats()
    for i, row in enumerate(rows[:-1]):
        assert_matches(row, offline[i % N_DISTINCT])  # the GPU loader's inputs are the CPU's, bit for bit
    assert rows[-1].error.startswith("<bytes #48>: not a PNG file")
    assert stats["errors"] == 1 and max(stats["batch_sizes"]) > 1
