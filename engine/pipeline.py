"""Classification pipeline: inputs → loader batches → backend logits → result rows."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from iws_engine.backends.base import sigmoid
from iws_engine.loaders.cpu import Batch, StageTimes
from iws_engine.outputs import Row

PNG_SUFFIXES = (".png",)


def expand_inputs(paths: Iterable[str | Path]) -> Iterator[str]:
    """Files as given; directories recursively, PNG files only, in a deterministic (sorted) order.

    A path that does not exist is passed through so that it yields an error row, not silence.
    """
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs.sort()
                found.extend(os.path.join(root, f) for f in files if f.lower().endswith(PNG_SUFFIXES))
            yield from sorted(found)
        else:
            yield str(p)


@dataclass
class RunStats:
    """What a run did and how long each stage took (wall seconds; stage CPU seconds summed)."""

    images: int = 0
    failed: int = 0
    wall: float = 0.0
    infer: float = 0.0
    stages: StageTimes = field(default_factory=StageTimes)

    @property
    def throughput(self) -> float:
        return self.images / self.wall if self.wall > 0 else 0.0


def score_batches(batches: Iterable[Batch], backend, *, threshold: float, model_id: str,
                  stats: RunStats | None = None) -> Iterator[Row]:
    """Run the backend on each batch and yield one row per input, in input order."""

    def probabilities(inputs: np.ndarray) -> np.ndarray:
        logits = np.empty((inputs.shape[0],), dtype=np.float32)
        backend.infer(inputs, logits)
        return sigmoid(logits)

    return rows_from_batches(batches, probabilities, threshold=threshold, model_id=model_id, stats=stats)


def rows_from_batches(batches: Iterable[Batch], probabilities: Callable[[np.ndarray], np.ndarray], *,
                      threshold: float, model_id: str, stats: RunStats | None = None) -> Iterator[Row]:
    """Score each batch's good inputs with `probabilities` (N,) and yield one row per input, in input order."""
    stats = stats if stats is not None else RunStats()
    start = time.perf_counter()
    for batch in batches:
        scores = np.empty((0,), dtype=np.float32)
        if batch.ok:
            t0 = time.perf_counter()
            scores = probabilities(batch.inputs)
            stats.infer += time.perf_counter() - t0
        by_item = dict(zip(batch.ok, scores))
        stats.stages.add(batch.times)
        for k, item in enumerate(batch.items):
            stats.images += 1
            if k in by_item:
                s = float(by_item[k])
                yield Row(item, s, int(s >= threshold), threshold, model_id, None)
            else:
                stats.failed += 1
                yield Row(item, None, None, threshold, model_id, batch.errors.get(k, f"{item}: no result"))
        stats.wall = time.perf_counter() - start
