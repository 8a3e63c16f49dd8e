"""The DALI loader: NVIDIA DALI's image decoder and GPU resize, as a *throughput baseline only*.

It does not compute the model's input. Honest differences from engine/preprocess.py:
- DALI decodes PNG on the CPU even with device="mixed" (DALI#1093; nvImageCodec#20): only the
  resize and what follows run on the GPU;
- the decoder delivers 8-bit RGB: 16-bit files lose their low byte (IWS vignettes are RGBA16);
- `fn.resize` (linear, no antialias) uses DALI's own sampling grid and float32 arithmetic, not
  Julia's imresize in float64 with its pixel-centre coordinates and half-to-even rounding;
- `fn.color_space_conversion` to GRAY uses DALI's coefficients and rounding, not Colors.jl's
  fixed-point Rec.601.
So scores computed from it are not the reference scores. `parity(items)` measures the gap on
real files; report it next to any throughput figure. Use --loader gpu for the exact device path.

Files are validated with `parse_png` first (a corrupt file would fail DALI's whole batch);
if DALI still fails a batch, that batch is decoded by the CPU loader's code instead.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from iws_engine.backends.base import cpu_cores
from iws_engine.loaders.cpu import DEFAULT_MAX_PIXELS, Batch, StageTimes, _label, load_one, read_input
from iws_engine.loaders.gpu import LoaderError
from iws_engine.loaders.png import PngError, parse_png
from iws_engine.preprocess import PreprocessSpec

PARITY_NOTE = ("DALI baseline: PNG decoded on the CPU, 16-bit reduced to 8-bit, DALI's linear resize and grey "
               "conversion instead of the Julia spec; inputs differ from preprocess_reference (see DaliLoader.parity)")


class DaliLoader:
    """Batches of (N, 1, H, W) float32 device arrays (CuPy) made by a DALI pipeline."""

    name = "dali"
    parity_note = PARITY_NOTE

    def __init__(self, spec: PreprocessSpec, batch_size: int = 64, device: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None, *, host_output: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        try:
            import cupy
            from nvidia import dali  # noqa: F401
        except ImportError as e:
            raise LoaderError(f"the DALI loader needs NVIDIA DALI and CuPy ({e}); install them with: "
                              "pip install nvidia-dali-cuda130 cupy-cuda13x") from None
        self._cp = cupy
        self.spec = spec
        self.batch_size = batch_size
        self.device = int(device)
        self.max_pixels = max_pixels
        self.workers = workers or cpu_cores()
        self.host_output = host_output
        self._pipe = self._build()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        height, width = self.spec.size
        mean, std = float(np.float32(self.spec.mean)), float(np.float32(self.spec.std))

        @pipeline_def(batch_size=self.batch_size, num_threads=self.workers, device_id=self.device,
                      prefetch_queue_depth=1)
        def png_to_input():
            encoded = fn.external_source(name="png", device="cpu", dtype=types.UINT8, ndim=1)
            rgb = fn.decoders.image(encoded, device="mixed", output_type=types.RGB)
            rgb = fn.resize(rgb, resize_x=width, resize_y=height, interp_type=types.INTERP_LINEAR, antialias=False)
            grey = fn.color_space_conversion(rgb, image_type=types.RGB, output_type=types.GRAY)
            x = fn.cast(grey, dtype=types.FLOAT)
            x = (x / 255.0 - mean) / std
            return fn.transpose(x, perm=[2, 0, 1])  # HWC -> CHW

        try:
            pipe = png_to_input()
            pipe.build()
        except Exception as e:  # no GPU, driver mismatch
            raise LoaderError(f"building the DALI pipeline on CUDA device {self.device} failed ({e})") from None
        return pipe

    def _read_and_validate(self, item, name: str) -> tuple[bytes | None, str | None, float]:
        t0 = time.perf_counter()
        try:
            data = bytes(read_input(item, name))
            parse_png(data, path=name, max_pixels=self.max_pixels)
            return data, None, time.perf_counter() - t0
        except PngError as e:
            return None, str(e), time.perf_counter() - t0

    def _run_dali(self, datas: list[bytes]):
        cp = self._cp
        self._pipe.feed_input("png", [np.frombuffer(d, np.uint8) for d in datas])
        (out,) = self._pipe.run()
        tensor = out.as_tensor()
        with cp.cuda.Device(self.device):
            if hasattr(tensor, "__cuda_array_interface__"):
                inputs = cp.array(tensor, copy=True)  # DALI reuses its buffers at the next run
            else:
                inputs = cp.asarray(np.asarray(out.as_cpu().as_tensor()))
            return inputs.astype(cp.float32, copy=False)

    def _run_on_cpu(self, datas: list[bytes], names: list[str]) -> tuple[np.ndarray, list[int], dict[int, str], StageTimes]:
        outs, ok, errors, times = [], [], {}, StageTimes()
        for k, (data, name) in enumerate(zip(datas, names)):
            out = np.empty(self.spec.size, np.float32)
            try:
                times.add(load_one(data, name, self.spec, self.max_pixels, out))
                outs.append(out)
                ok.append(k)
            except PngError as e:
                errors[k] = str(e)
        h, w = self.spec.size
        return (np.stack(outs)[:, None] if outs else np.empty((0, 1, h, w), np.float32)), ok, errors, times

    def batches(self, items: Iterable[str | Path | bytes]) -> Iterator[Batch]:
        source = iter(items)
        index = 0
        with ThreadPoolExecutor(self.workers, thread_name_prefix="iws-dali-read") as pool:
            while True:
                chunk = []
                for item in source:
                    chunk.append((item, _label(item, index)))
                    index += 1
                    if len(chunk) == self.batch_size:
                        break
                if not chunk:
                    return
                names = [name for _, name in chunk]
                results = list(pool.map(lambda pair: self._read_and_validate(*pair), chunk))
                times = StageTimes(read=sum(r[2] for r in results))
                errors = {k: r[1] for k, r in enumerate(results) if r[1] is not None}
                ok = [k for k, r in enumerate(results) if r[1] is None]
                datas = [results[k][0] for k in ok]
                inputs: Any
                try:
                    t0 = time.perf_counter()
                    inputs = self._run_dali(datas) if datas else self._cp.empty((0, 1, *self.spec.size), self._cp.float32)
                    times.decode += time.perf_counter() - t0
                except Exception:
                    self._pipe = self._build()  # a failed run can leave the pipeline unusable
                    host, good, bad, cpu_times = self._run_on_cpu(datas, [names[k] for k in ok])
                    errors.update({ok[j]: reason for j, reason in bad.items()})
                    ok = [ok[j] for j in good]
                    times.add(cpu_times)
                    inputs = host if self.host_output else self._cp.asarray(host)
                if self.host_output and not isinstance(inputs, np.ndarray):
                    inputs = self._cp.asnumpy(inputs)
                yield Batch(items=names, inputs=inputs, ok=ok, errors=errors, times=times)

    def parity(self, items: Iterable[str | Path | bytes]) -> dict[str, float]:
        """Largest and mean |DALI - preprocess_reference| over `items`, and how many were compared."""
        from iws_engine.loaders.cpu import CpuLoader

        reference = CpuLoader(self.spec, batch_size=self.batch_size, workers=self.workers, max_pixels=self.max_pixels)
        items = list(items)
        worst, total, count = 0.0, 0.0, 0
        for ours, ref in zip(self.batches(items), reference.batches(items)):
            mine = ours.inputs if isinstance(ours.inputs, np.ndarray) else self._cp.asnumpy(ours.inputs)
            mine_by_item = dict(zip(ours.ok, mine))
            for k, expected in zip(ref.ok, ref.inputs):
                if k in mine_by_item:
                    diff = np.abs(mine_by_item[k].astype(np.float64) - expected)
                    worst = max(worst, float(diff.max()))
                    total += float(diff.mean())
                    count += 1
        return {"max_abs_diff": worst, "mean_abs_diff": total / count if count else 0.0, "images": count}
