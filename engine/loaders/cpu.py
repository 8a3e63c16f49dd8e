"""The CPU loader: PNG decode + reference preprocessing in a thread pool, yielding batches.

The native decode core (loaders/native.py), the native general decoder (png.decode_parsed) and NumPy's big operations
release the GIL, so threads scale across cores without pickling images between processes. In-flight work is bounded (a few batches), so a
17-million-image archive runs in constant memory, and decoding of the next batch overlaps the
inference of the current one.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from iws_engine.backends.base import cpu_cores
from iws_engine.preprocess import PreprocessSpec, preprocess_reference

DEFAULT_MAX_PIXELS = 64_000_000

InputItem = str | Path | bytes
#: Fills `out` (one item's model input) from an input named `name`; raises PngError for a bad input.
PreprocessOne = Callable[[InputItem, str, np.ndarray], "StageTimes"]


@dataclass
class StageTimes:
    """Seconds of work per stage, summed over worker threads (CPU time, not wall time)."""

    read: float = 0.0
    decode: float = 0.0
    preprocess: float = 0.0

    def add(self, other: "StageTimes") -> None:
        self.read += other.read
        self.decode += other.decode
        self.preprocess += other.preprocess


@dataclass
class Batch:
    """Inputs of one batch: `inputs[k]` belongs to `items[ok[k]]`; failed items have an error."""

    items: list[str]
    inputs: np.ndarray  # (len(ok), C, H, W) float32; a torch bfloat16 tensor for CpuLoader(input_dtype="bfloat16")
    ok: list[int]
    errors: dict[int, str] = field(default_factory=dict)
    times: StageTimes = field(default_factory=StageTimes)


def read_input(item: InputItem, name: str) -> bytes:
    """The bytes of an input (a path is read); raises PngError naming `name` when it cannot be read."""
    from iws_engine.loaders.png import PngError

    if isinstance(item, (bytes, bytearray, memoryview)):
        return item
    try:
        return Path(item).read_bytes()
    except IsADirectoryError:
        raise PngError("is a directory, not a PNG file", path=name) from None
    except OSError as e:
        raise PngError(f"cannot read file ({e.strerror or e})", path=name) from None


def load_one(item: InputItem, name: str, spec: PreprocessSpec, max_pixels: int, out: np.ndarray, *,
             native: bool = True) -> StageTimes:
    """Read, decode and preprocess one PNG into `out` (H, W); raises PngError naming `name`.

    With `native` (and the native core built), files it handles go through it in one GIL-free call (its time is
    counted as decode: preprocessing is fused into it); the others, and every file with native=False, through
    decode_png + the NumPy reference. Both give identical model inputs (tests/test_native_decode.py). `out` may
    also be float16 or uint16 holding bfloat16 (native.OUT_DTYPES, which need the native core): the float32 input
    rounded to nearest-even, the same either way.
    """
    from iws_engine.loaders import native as native_core
    from iws_engine.loaders.png import decode_parsed, parse_png

    t = StageTimes()
    t0 = time.perf_counter()
    data = read_input(item, name)
    t1 = time.perf_counter()
    info = parse_png(data, path=name, max_pixels=max_pixels)
    if native and native_core.handles(info):
        native_core.decode_preprocess(info, spec, out, path=name)
        t.read, t.decode = t1 - t0, time.perf_counter() - t1
        return t
    pixels = decode_parsed(info, path=name)
    t2 = time.perf_counter()
    if out.dtype == np.float32:
        preprocess_reference(pixels, spec, out=out)
    else:
        native_core.round_float32(preprocess_reference(pixels, spec), out)
    t3 = time.perf_counter()
    t.read, t.decode, t.preprocess = t1 - t0, t2 - t1, t3 - t2
    return t


def load_clip_one(item: InputItem, name: str, spec, max_pixels: int, out: np.ndarray) -> StageTimes:
    """Read one PNG and write Pipeline A's input into `out` (3, S, S) as the paper made it: Pillow's
    `Image.open(f).convert("RGB")`, then `preprocess_clip_reference`. `spec` is a ClipPreprocessSpec.

    Pillow opens other formats and decompression bombs, so this refuses them first; every failure is
    a PngError naming `name`. (Pipeline A's CPU loader, through pipeline_a.clip_png_preprocess, and the
    GPU loader's per-image fallback for a CLIP spec.)
    """
    import io

    from PIL import Image

    from iws_engine.loaders.png import PngError
    from iws_engine.preprocess_clip import load_rgb, preprocess_clip_reference

    t = StageTimes()
    t0 = time.perf_counter()
    data = read_input(item, name)
    t1 = time.perf_counter()
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            if img.format != "PNG":  # Pillow opens JPEG, GIF, ...: the engine's inputs are PNG only
                raise PngError(f"not a PNG file (Pillow reads it as {img.format})", path=name)
            if img.width * img.height > max_pixels:  # decompression bombs: refuse before decoding
                raise PngError(f"{img.width}x{img.height} exceeds --max-pixels {max_pixels}", path=name)
            rgb = load_rgb(img)
    except PngError:
        raise
    except Image.UnidentifiedImageError:
        raise PngError("not a PNG file (Pillow cannot identify it)", path=name) from None
    except Image.DecompressionBombError as e:
        raise PngError(f"refused by Pillow ({e})", path=name) from None
    except (OSError, SyntaxError, ValueError) as e:  # what Pillow raises for unreadable/truncated files
        raise PngError(f"cannot decode PNG ({type(e).__name__}: {e})", path=name) from None
    t2 = time.perf_counter()
    preprocess_clip_reference(rgb, spec, out=out)
    t.read, t.decode, t.preprocess = t1 - t0, t2 - t1, time.perf_counter() - t2
    return t


class CpuLoader:
    """Batches of model input made by worker threads.

    By default each item is a PNG decoded and preprocessed to the SAR_CNN reference (`load_one`)
    into (1, *spec.size). Another model's preprocessing plugs in through
    `preprocess_one(item, name, out)` with `item_shape`, the shape of its `out` (e.g. Pipeline A's
    CLIP preprocessing into (3, 448, 448)); batching, ordering and error rows stay the same.
    """

    name = "cpu"

    def __init__(self, spec: PreprocessSpec | None, batch_size: int = 64, workers: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, prefetch_batches: int = 2, *,
                 preprocess_one: PreprocessOne | None = None, item_shape: tuple[int, ...] | None = None,
                 native: bool = True, input_dtype: str = "float32"):
        """`input_dtype`: the element type of the batches, "float32", or "bfloat16" / "float16" (the float32 input
        rounded to nearest-even, written so by the native core) for a backend that takes it (Backend.input_dtype);
        float32 where the native core is not built. bfloat16 batches are torch tensors (NumPy has no bfloat16)."""
        from iws_engine.loaders import native as native_core

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if input_dtype not in native_core.OUT_DTYPES:
            raise ValueError(f"input_dtype must be one of {', '.join(native_core.OUT_DTYPES)}, not {input_dtype!r}")
        if preprocess_one is not None and input_dtype != "float32":
            raise ValueError("a custom preprocess_one writes float32: input_dtype must be float32 with it")
        if preprocess_one is not None and item_shape is None:
            raise ValueError("a custom preprocess_one needs the item_shape it writes")
        if preprocess_one is None and spec is None:
            raise ValueError("the default PNG preprocessing needs a PreprocessSpec")
        self.spec = spec
        self.batch_size = batch_size
        self.workers = workers or cpu_cores()
        self.max_pixels = max_pixels
        self.prefetch_batches = max(1, prefetch_batches)
        self.item_shape = tuple(item_shape) if item_shape is not None else (1, *spec.size)
        self.native = native  # the native decode core where built (load_one); False: decode_png + NumPy reference
        self.input_dtype = input_dtype if native_core.available() else "float32"
        self._storage = np.dtype(native_core.OUT_DTYPES[self.input_dtype])  # bfloat16 as its uint16 bits
        self.preprocess_one: PreprocessOne = preprocess_one or self._reference_preprocess

    def _reference_preprocess(self, item: InputItem, name: str, out: np.ndarray) -> StageTimes:
        # the reference writes one grey (H, W) plane: the single channel of `out` (1, H, W)
        return load_one(item, name, self.spec, self.max_pixels, out[0], native=self.native)

    def load_item(self, item, name: str) -> tuple[np.ndarray | None, str | None, StageTimes]:
        """One input's model input, or (None, error naming `name`); never raises for a bad input.
        (Used per request by iws_engine.batching; batches() writes straight into its batch tensors instead.)"""
        out = np.empty(self.item_shape, dtype=self._storage)
        err, times = self.load_into(item, name, out)
        return (out if err is None else None), err, times

    def load_into(self, item, name: str, out: np.ndarray) -> tuple[str | None, StageTimes]:
        """Write one input's model input into `out` (a slot of a batch tensor); (error naming `name`, times).
        Never raises for a bad input."""
        from iws_engine.loaders.png import PngError

        try:
            return None, self.preprocess_one(item, name, out)
        except PngError as e:
            return str(e), StageTimes()
        except MemoryError:
            return f"{name}: out of memory while decoding", StageTimes()
        except Exception as e:  # a decoder bug must not cost the other images their results
            return f"{name}: internal error while decoding ({type(e).__name__}: {e})", StageTimes()

    def batches(self, items: Iterable[str | Path | bytes]) -> Iterator[Batch]:
        """Batches in input order; decoding runs up to `prefetch_batches` batches ahead.

        Each batch's tensor is allocated once and the workers write every input straight into its slot (no
        per-image array, no stacking copy); only a batch with failed inputs is compacted to its good rows.
        """
        with ThreadPoolExecutor(self.workers, thread_name_prefix="iws-decode") as pool:
            pending: deque = deque()
            index = 0
            source = iter(items)
            limit = self.batch_size * (self.prefetch_batches + 1)
            tensor: np.ndarray | None = None  # the batch tensor being filled

            def fill():
                nonlocal index, tensor
                while len(pending) < limit:
                    try:
                        item = next(source)
                    except StopIteration:
                        return
                    slot = index % self.batch_size  # batches are consecutive runs of batch_size inputs
                    if slot == 0:
                        tensor = np.empty((self.batch_size, *self.item_shape), dtype=self._storage)
                    name = _label(item, index)
                    pending.append((name, tensor, pool.submit(self.load_into, item, name, tensor[slot])))
                    index += 1

            fill()
            while pending:
                chunk = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
                fill()  # keep the workers busy while this batch is assembled and inferred
                labels, ok, errors, times = [], [], {}, StageTimes()
                for k, (name, _, fut) in enumerate(chunk):
                    err, t = fut.result()
                    labels.append(name)
                    times.add(t)
                    if err is None:
                        ok.append(k)
                    else:
                        errors[k] = err
                batch_tensor = chunk[0][1]
                inputs = batch_tensor[:len(chunk)] if not errors else batch_tensor[ok]
                yield Batch(items=labels, inputs=self.as_batch(inputs), ok=ok, errors=errors, times=times)

    def as_batch(self, inputs: np.ndarray):
        """Stacked load_item outputs as the batch a backend takes (bfloat16 bits -> a torch bfloat16 view)."""
        if self.input_dtype != "bfloat16":
            return inputs
        import torch  # a bfloat16 batch is for a torch backend

        return torch.from_numpy(inputs.view(np.int16)).view(torch.bfloat16)


def _label(item, index: int) -> str:
    """How an input is named in rows and errors: its path, or its position for in-memory bytes."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<bytes #{index}>"
    return str(item)
