"""A shared, thread-safe dynamic-batching classifier: what Triton's dynamic batcher does for a server, in process.

    from iws_engine import BatchingClassifier
    with BatchingClassifier(max_batch_size=16, max_queue_delay_ms=5) as clf:   # one model for all callers
        future = clf.submit(png_bytes)              # from any thread: concurrent.futures.Future[Row]
        row = await clf.classify_async(path)        # from any asyncio task
        rows = clf.classify_many([a, b, c])         # in order

Requests from every caller go into one bounded queue. A dispatcher thread starts each request's decode
in the loader's threads (`CpuLoader.load_item`, the same decode + preprocessing and error messages as
`classify`) as soon as a slot is free; decoded requests wait in a ready pool, and the inference thread
takes up to `max_batch_size` of them, waiting at most `max_queue_delay_ms` (from the oldest ready
request) for a batch to fill: not at all when a full batch is ready, nor once every accepted request is
ready (none queued or decoding could join; only a new submission could). Decoding thus overlaps the previous
batch's inference, and a slow or bad input only delays itself: a batch is formed from inputs that are
already decoded, and a bad one resolves its own future with an error row at once.

A batch loader (`gpu`, `dali`: they decode a whole batch on the device) has no per-request decode:
with `decode="per_batch"` (their default) requests join the ready pool undecoded, the same rules form
a batch, and the loader's own `batches()` decodes that batch's items right before its inference (no
overlap with the previous batch: device decode is short next to inference). A bad input still gets its
own error row; a slow input (a stalled read) delays its batch and those behind it, as one batch is
decoded and inferred at a time. `decode="per_batch"` runs with the cpu loader too (its `batches()`),
which is how CI exercises this path without a GPU.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from iws_engine.loaders.cpu import Batch
from iws_engine.outputs import Row
from iws_engine.pipeline import rows_from_batches

PIPELINES = ("sarcnn", "eva02xgb")
DECODE_MODES = ("per_request", "per_batch")
LATENCY_WINDOW = 10_000  # latency percentiles are over the last this many requests
DEADLINE_SWEEP_S = 0.05  # while the dispatcher waits for a slot, it times out expired queued requests this often


class BatcherClosed(RuntimeError):
    """submit() after close()."""


class QueueFull(RuntimeError):
    """The bounded request queue is full and the caller chose not to wait (or waited `timeout`)."""


@dataclass(eq=False)
class _Request:
    item: str | Path | bytes
    name: str
    future: Future
    submitted: float
    deadline: float | None  # time.monotonic() by which the request must have started, or None
    inputs: np.ndarray | None = None
    ready_at: float = 0.0


@dataclass
class _Counters:
    requests: int = 0
    completed: int = 0
    errors: int = 0
    timeouts: int = 0
    cancelled: int = 0
    batches: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


class BatchingClassifier:
    """One loaded model shared by any number of threads and asyncio tasks, batching their requests.

    The model, backend and loader options are `Classifier`'s (`pipeline="sarcnn"`, the default) or
    `EvaXgbClassifier`'s (`pipeline="eva02xgb"`, with `xgboost_model`), passed through `options`; or
    give an already built `classifier` (it stays the caller's to close). `decode`: "per_request" (each
    request decoded by the loader's `load_item` as soon as it is taken; the cpu loader's default) or
    "per_batch" (each formed batch decoded by the loader's `batches()`; the default for the gpu and dali
    loaders, which have no per-request decode). `max_batch_size` defaults to the classifier's batch
    size; `max_queue` bounds the requests accepted but not yet started; `max_inflight` the requests
    decoding or decoded (per batch: taken) and waiting for a batch (default: two batches).
    """

    def __init__(self, weights: str | Path | None = None, *, pipeline: str = "sarcnn",
                 xgboost_model: str | Path | None = None, classifier=None, max_batch_size: int | None = None,
                 max_queue_delay_ms: float = 5.0, max_queue: int = 1024, max_inflight: int | None = None,
                 decode: str | None = None, **options):
        if decode not in (None, *DECODE_MODES):
            raise ValueError(f"unknown decode mode {decode!r}; choose from {', '.join(DECODE_MODES)}")
        if classifier is None:
            options.setdefault("loader", "cpu")  # the embedded default; "gpu"/"dali" must be asked for
            if pipeline == "sarcnn":
                from iws_engine.api import Classifier

                if xgboost_model is not None:
                    raise ValueError("xgboost_model is for pipeline='eva02xgb'")
                classifier = Classifier(weights, **options)
            elif pipeline == "eva02xgb":
                from iws_engine.pipeline_a import EvaXgbClassifier

                classifier = EvaXgbClassifier(xgboost_model, weights, **options)
            else:
                raise ValueError(f"unknown pipeline {pipeline!r}; choose from {', '.join(PIPELINES)}")
            self._owns_classifier = True
        else:
            if weights is not None or xgboost_model is not None or options:
                raise ValueError("give either a classifier or the options to build one, not both")
            self._owns_classifier = False
        per_request_capable = hasattr(classifier.loader, "load_item")
        decode = decode or ("per_request" if per_request_capable else "per_batch")
        if decode == "per_request" and not per_request_capable:
            if self._owns_classifier:
                classifier.close()
            raise ValueError(f"decode='per_request' needs a loader that decodes one input at a time (cpu), not "
                             f"{getattr(classifier.loader, 'name', type(classifier.loader).__name__)!r}; "
                             "use decode='per_batch'")
        self.decode = decode
        self.classifier = classifier
        self.max_batch_size = int(max_batch_size or classifier.batch_size)
        self.max_queue_delay = float(max_queue_delay_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.max_inflight = int(max_inflight or 2 * self.max_batch_size)
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_inflight < 1 or self.max_queue_delay < 0:
            raise ValueError("max_batch_size, max_queue and max_inflight must be >= 1, max_queue_delay_ms >= 0")
        self.threshold = classifier.threshold
        self.model_id = classifier.model_id
        self._loader = classifier.loader
        self._lock = threading.Lock()
        self._queue_not_empty = threading.Condition(self._lock)
        self._queue_not_full = threading.Condition(self._lock)
        self._ready_changed = threading.Condition(self._lock)  # ready pool grew, or a request finished
        self._queue: deque[_Request] = deque()
        self._ready: deque[_Request] = deque()
        self._slots = threading.Semaphore(self.max_inflight)
        self._unfinished = 0
        self._closed = False
        self._close_lock = threading.Lock()
        self._shut_down = False
        self._sequence = 0
        self._counters = _Counters()
        self._decoders = (ThreadPoolExecutor(self._loader.workers, thread_name_prefix="iws-decode")
                          if decode == "per_request" else None)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="iws-batch-dispatch", daemon=True)
        self._inference = threading.Thread(target=self._inference_loop, name="iws-batch-infer", daemon=True)
        self._dispatcher.start()
        self._inference.start()

    # ----- the caller's side -----
    def submit(self, x: str | Path | bytes, *, block: bool = True, timeout: float | None = None,
               deadline: float | None = None, name: str | None = None) -> Future:
        """Queue one PNG (bytes or a path); its Future resolves to a Row, an error row for a bad input.

        When the queue is full, wait (`block`, at most `timeout` seconds) or raise QueueFull. `deadline`:
        seconds from now within which the request must start (be taken for decoding; per batch: be taken
        into a batch), else it resolves
        to a timeout error row. `name`: how the row names the input (default: the path, or
        "<bytes #k>" with k the request's number). Raises BatcherClosed after close().
        """
        if not isinstance(x, (bytes, bytearray, memoryview, str, Path)):
            raise TypeError(f"submit() takes PNG bytes or a path, not {type(x).__name__}")
        now = time.monotonic()
        limit = None if timeout is None else now + timeout
        with self._lock:
            while True:
                if self._closed:
                    raise BatcherClosed("this BatchingClassifier is closed")
                if len(self._queue) < self.max_queue:
                    break
                remaining = None if limit is None else limit - time.monotonic()
                if not block or (remaining is not None and remaining <= 0):
                    raise QueueFull(f"request queue full ({self.max_queue} waiting)")
                self._queue_not_full.wait(remaining)
            seq = self._sequence
            self._sequence += 1
            if name is None:
                name = f"<bytes #{seq}>" if isinstance(x, (bytes, bytearray, memoryview)) else str(x)
            request = _Request(x, name, Future(), now, None if deadline is None else now + deadline)
            self._queue.append(request)
            self._unfinished += 1
            self._counters.requests += 1
            self._queue_not_empty.notify()
        return request.future

    async def classify_async(self, x: str | Path | bytes, *, deadline: float | None = None,
                             name: str | None = None) -> Row:
        """The Row for one input, awaited without blocking the event loop (a full queue is waited for in a
        thread). Cancelling the task withdraws a request that has not started."""
        try:
            future = self.submit(x, block=False, deadline=deadline, name=name)
        except QueueFull:
            loop = asyncio.get_running_loop()
            future = await loop.run_in_executor(
                None, functools.partial(self.submit, x, block=True, deadline=deadline, name=name))
        return await asyncio.wrap_future(future)

    def classify_many(self, inputs: Iterable[str | Path | bytes], *, deadline: float | None = None) -> list[Row]:
        """One row per input (directories expanded as `classify` does), in order."""
        from iws_engine.api import _expand_mixed

        futures = [self.submit(x, deadline=deadline) for x in _expand_mixed(inputs)]
        return [f.result() for f in futures]

    def stats(self) -> dict:
        """Counts so far, the batch-size distribution, the queue now, and latency percentiles (submit to
        result, ms, over the last LATENCY_WINDOW requests)."""
        with self._lock:
            c = self._counters
            sizes = dict(sorted(c.batch_sizes.items()))
            latencies = np.array(c.latencies, dtype=np.float64) * 1000.0
            queued = len(self._queue)
            out = {"requests": c.requests, "completed": c.completed, "errors": c.errors, "timeouts": c.timeouts,
                   "cancelled": c.cancelled, "batches": c.batches,
                   "mean_batch_size": (sum(k * v for k, v in sizes.items()) / c.batches) if c.batches else 0.0,
                   "batch_sizes": sizes, "queue_depth": queued, "in_flight": self._unfinished - queued}
        out["latency_ms"] = ({f"p{q}": float(np.percentile(latencies, q)) for q in (50, 95, 99)}
                             if latencies.size else {"p50": None, "p95": None, "p99": None})
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Refuse new requests, finish every accepted one, then free the backend (when built here)."""
        with self._close_lock:
            if self._shut_down:
                return
            with self._lock:
                self._closed = True
                self._queue_not_empty.notify_all()
                self._queue_not_full.notify_all()  # blocked submitters raise BatcherClosed
                self._ready_changed.notify_all()
            self._dispatcher.join()
            self._inference.join()
            if self._decoders is not None:
                self._decoders.shutdown(wait=True)
            if self._owns_classifier:
                self.classifier.close()
            self._shut_down = True

    def __enter__(self) -> "BatchingClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- the worker threads -----
    def _dispatch_loop(self) -> None:
        """Take requests in arrival order and start their decode as slots free up."""
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._queue_not_empty.wait()
                if not self._queue:  # closed and drained
                    return
                request = self._queue.popleft()
                self._queue_not_full.notify()
            if not request.future.set_running_or_notify_cancel():  # withdrawn by its caller
                self._finish(request, None)
                continue
            if self._expired(request):
                continue
            acquired = False
            while not acquired:  # a request past its deadline is answered now, not when a slot frees
                acquired = self._slots.acquire(timeout=DEADLINE_SWEEP_S)
                if not acquired:
                    self._sweep_expired()
                    if self._expired(request):
                        break
            if not acquired:
                continue
            if self._expired(request):
                self._slots.release()
                continue
            if self._decoders is None:  # per batch: the batch's loader call decodes it
                self._make_ready(request)
                continue
            try:
                self._decoders.submit(self._decode, request)
            except RuntimeError as e:  # the pool is gone: cannot happen before close() joins us
                self._slots.release()
                self._finish(request, self._error_row(request, f"internal error ({e})"))

    def _sweep_expired(self) -> None:
        """Take the queued requests whose deadline has passed out of the queue and answer them."""
        now = time.monotonic()
        with self._lock:
            expired = [r for r in self._queue if r.deadline is not None and r.deadline < now]
            if not expired:
                return
            gone = set(map(id, expired))
            self._queue = deque(r for r in self._queue if id(r) not in gone)
            self._queue_not_full.notify(len(expired))
        for request in expired:
            if request.future.set_running_or_notify_cancel():
                self._expired(request)
            else:
                self._finish(request, None)

    def _expired(self, request: _Request) -> bool:
        """Resolve `request` with a timeout row when it can no longer start before its deadline."""
        if request.deadline is None or time.monotonic() <= request.deadline:
            return False
        waited = (time.monotonic() - request.submitted) * 1000.0
        budget = (request.deadline - request.submitted) * 1000.0
        with self._lock:
            self._counters.timeouts += 1
        self._finish(request, self._error_row(
            request, f"timed out: not started within its deadline of {budget:.0f} ms (waited {waited:.0f} ms)"))
        return True

    def _decode(self, request: _Request) -> None:
        """In a loader thread: decode + preprocess; a bad input resolves at once, a good one joins the pool."""
        try:
            inputs, error, _ = self._loader.load_item(request.item, request.name)
        except Exception as e:  # load_item reports bad inputs itself; this is a last resort
            inputs, error = None, f"{request.name}: internal error while decoding ({type(e).__name__}: {e})"
        if inputs is None:
            self._slots.release()
            self._finish(request, self._error_row(request, error, prefixed=True))
            return
        request.inputs = inputs
        self._make_ready(request)

    def _make_ready(self, request: _Request) -> None:
        request.ready_at = time.monotonic()
        with self._lock:
            self._ready.append(request)
            self._ready_changed.notify()

    def _inference_loop(self) -> None:
        """Form batches from decoded requests (dynamic batching) and infer them, one at a time."""
        while True:
            with self._lock:
                while not self._ready and not (self._closed and self._unfinished == 0):
                    self._ready_changed.wait()
                if not self._ready:  # closed and everything accepted has finished
                    return
                fill_by = self._ready[0].ready_at + self.max_queue_delay
                while len(self._ready) < self.max_batch_size and not self._closed:
                    if self._unfinished == len(self._ready):  # nothing queued or decoding could join
                        break
                    remaining = fill_by - time.monotonic()
                    if remaining <= 0:
                        break
                    self._ready_changed.wait(remaining)
                batch = [self._ready.popleft() for _ in range(min(self.max_batch_size, len(self._ready)))]
            for _ in batch:
                self._slots.release()
            if self._decoders is None:
                # per batch, a request starts now: one whose deadline passed while it waited is answered instead
                batch = [r for r in batch if not self._expired(r)]
                if batch:
                    self._decode_and_infer(batch)
            else:
                self._infer(batch)

    def _decode_and_infer(self, batch: list[_Request]) -> None:
        """Per batch: the loader's `batches()` decodes the batch's raw inputs, then the pipeline's row making."""
        clf = self.classifier
        try:
            rows = list(rows_from_batches(self._loader.batches([r.item for r in batch]), clf.predict,
                                          threshold=clf.threshold, model_id=clf.model_id))
            if len(rows) != len(batch):
                raise RuntimeError(f"the loader returned {len(rows)} rows for {len(batch)} inputs")
            # the loader names inputs by their place in this batch ("<bytes #k>"); rows name the request
            rows = [_renamed(row, r.name) for row, r in zip(rows, batch)]
        except Exception as e:  # the loader or backend failed: every request of this batch says so
            rows = [self._error_row(r, f"internal error during decoding or inference ({type(e).__name__}: {e})")
                    for r in batch]
        with self._lock:
            self._counters.batches += 1
            self._counters.batch_sizes[len(batch)] += 1
        for request, row in zip(batch, rows):
            self._finish(request, row)

    def _infer(self, batch: list[_Request]) -> None:
        clf = self.classifier
        try:
            inputs = np.stack([r.inputs for r in batch])
            as_batch = getattr(self._loader, "as_batch", None)  # e.g. bfloat16 bits -> a bfloat16 tensor
            if as_batch is not None:
                inputs = as_batch(inputs)
            for r in batch:
                r.inputs = None  # the stacked copy is all that is needed now
            # the pipeline's own row making: one batch of decoded inputs -> rows in order
            rows = list(rows_from_batches([Batch(items=[r.name for r in batch], inputs=inputs,
                                                 ok=list(range(len(batch))))],
                                          clf.predict, threshold=clf.threshold, model_id=clf.model_id))
        except Exception as e:  # the backend failed: every request of this batch says so, the batcher lives on
            rows = [self._error_row(r, f"internal error during inference ({type(e).__name__}: {e})") for r in batch]
        with self._lock:
            self._counters.batches += 1
            self._counters.batch_sizes[len(batch)] += 1
        for request, row in zip(batch, rows):
            self._finish(request, row)

    def _error_row(self, request: _Request, reason: str | None, prefixed: bool = False) -> Row:
        error = reason if prefixed and reason else f"{request.name}: {reason or 'no result'}"
        return Row(request.name, None, None, self.threshold, self.model_id, error)

    def _finish(self, request: _Request, row: Row | None) -> None:
        """Account for `request`, then resolve it with `row` (None: it was cancelled), so that stats() read
        after a result never lags behind it."""
        with self._lock:
            c = self._counters
            if row is None:
                c.cancelled += 1
            else:
                c.completed += 1
                c.errors += not row.ok
                c.latencies.append(time.monotonic() - request.submitted)
            self._unfinished -= 1
            self._ready_changed.notify()
        if row is not None:
            request.future.set_result(row)


def _renamed(row: Row, name: str) -> Row:
    """`row` under the request's name (its error's leading "label:" too)."""
    error = row.error
    if error is not None and error.startswith(f"{row.path}:"):
        error = name + error[len(row.path):]
    return replace(row, path=name, error=error)
