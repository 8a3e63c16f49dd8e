"""TensorRT: an engine built from the ONNX export, run from device buffers with CUDA-graph replay.

Written against the TensorRT 10.x Python API docs; not yet run (no TensorRT on our machines: the
CPU machines cannot install it and the H100 test machine has no wheel for it yet).

The module is split into pure seams, tested on the CPU, and the TensorRT calls:
- `ProfileSpec`: the optimisation profile's (min, opt, max) input shapes;
- `precision_flags`: the BuilderFlags for a precision on a GPU of a given compute capability;
- `CalibrationStream` / `CalibrationCache`: fixed-size INT8 calibration batches and their cache;
- `build_engine`: ONNX → serialized engine (explicit batch, one optimisation profile, persistent
  timing cache, optional INT8 entropy calibration; FP8 Q/DQ graphs as strongly typed networks);
- `TensorRTBackend`: deserializes an engine and runs it with `execute_async_v3` from torch CUDA
  buffers on a torch CUDA stream, one captured CUDA graph per fixed batch size.

`import tensorrt` happens only inside functions, so this module imports everywhere.
INT8 calibrators and weakly-typed precision flags (FP16/BF16/INT8/FP8) are deprecated since
TensorRT 10.1 and removed in 11.0 (explicit quantization with Q/DQ nodes replaces them): on 11.x
the flag lookup fails with a BackendError that says so.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iws_engine.backends.base import Backend, BackendError
from iws_engine.backends.torch_support import plan_graph_batch, to_device_tensor, write_output

#: BuilderFlag names per precision. INT8 keeps FP16 as the fallback for layers without INT8
#: kernels (else they run in fp32). FP8 only works on an explicitly quantized (Q/DQ) ONNX.
PRECISION_FLAGS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "tf32": ("TF32",),
    "fp16": ("FP16",),
    "bf16": ("BF16",),
    "int8": ("INT8", "FP16"),
    "fp8": ("FP8",),
}
#: the oldest GPU generation with hardware support, as (major, minor) compute capability
MIN_COMPUTE_CAPABILITY: dict[str, tuple[int, int]] = {"tf32": (8, 0), "bf16": (8, 0), "fp8": (8, 9)}
ENGINE_SUFFIXES = (".engine", ".plan")
#: the batch profile for engines built in-process from weights (bench, Classifier without build)
DEFAULT_BATCH_PROFILE = (1, 64, 4096)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# ----------------------------------------------------------------------------- pure seams
@dataclass(frozen=True)
class ProfileSpec:
    """An optimisation profile: min/opt/max input shapes, batch first."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def from_batch(cls, min_batch: int, opt_batch: int, max_batch: int, input_shape: tuple[int, ...]) -> "ProfileSpec":
        if not 1 <= min_batch <= opt_batch <= max_batch:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {min_batch}:{opt_batch}:{max_batch}")
        sample = tuple(int(d) for d in input_shape)
        return cls((min_batch, *sample), (opt_batch, *sample), (max_batch, *sample))

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max), the argument order of IOptimizationProfile.set_shape."""
        return self.min, self.opt, self.max

    @property
    def max_batch(self) -> int:
        return self.max[0]


def parse_compute_capability(cc: str | tuple[int, int]) -> tuple[int, int]:
    """`"8.9"` or `(8, 9)` → (8, 9)."""
    if isinstance(cc, str):
        major, _, minor = cc.partition(".")
        try:
            return int(major), int(minor or 0)
        except ValueError:
            raise ValueError(f"compute capability must look like 8.9, got {cc!r}") from None
    major, minor = cc
    return int(major), int(minor)


def precision_flags(precision: str, gpu_cc: str | tuple[int, int]) -> list[str]:
    """BuilderFlag names that make an engine of `precision` on a GPU of compute capability `gpu_cc`.

    Refuses a precision the GPU has no hardware for, instead of building an engine whose label
    lies (TensorRT would silently fall back to a wider type).
    """
    if precision not in PRECISION_FLAGS:
        raise BackendError(f"tensorrt backend: unknown precision {precision!r} ({', '.join(PRECISION_FLAGS)})")
    cc = parse_compute_capability(gpu_cc)
    needed = MIN_COMPUTE_CAPABILITY.get(precision)
    if needed and cc < needed:
        raise BackendError(f"tensorrt backend: {precision} needs compute capability >= {needed[0]}.{needed[1]} "
                           f"({'Ada, Hopper or newer' if precision == 'fp8' else 'Ampere or newer'}); "
                           f"this GPU has {cc[0]}.{cc[1]}")
    return list(PRECISION_FLAGS[precision])


def has_explicit_quantization(onnx_path: str | Path) -> bool:
    """Whether the ONNX graph holds Q/DQ nodes (explicit quantization, e.g. from NVIDIA ModelOpt)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def check_quantization(precision: str, onnx_path: str | Path, has_calibrator: bool) -> None:
    """Refuse builds that would silently not be quantized: FP8 has no calibrator in TensorRT and
    needs Q/DQ nodes; INT8 needs either Q/DQ nodes or calibration data."""
    if precision not in ("int8", "fp8") or has_explicit_quantization(onnx_path):
        return
    if precision == "fp8":
        raise BackendError(f"tensorrt backend: fp8 needs an explicitly quantized ONNX (Q/DQ nodes, e.g. from NVIDIA "
                           f"ModelOpt); {onnx_path} has none and TensorRT has no FP8 calibration. `iws-engine build "
                           "--backend tensorrt --precision fp8 [--calib DIR]` quantizes the export itself")
    if not has_calibrator:
        raise BackendError("tensorrt backend: int8 needs calibration data (iws-engine build --calib DIR) "
                           f"or an ONNX with Q/DQ nodes; {onnx_path} has none")


class CalibrationStream:
    """Fixed-size calibration batches cut from an iterable of (N, C, H, W) float32 arrays.

    TensorRT's calibrator asks for batches of exactly `batch_size` images. The final remainder
    (fewer than `batch_size` images) is, by `remainder`:
    - "pad" (default): filled by repeating the remainder's own images cyclically, so every image
      is used and no synthetic (e.g. all-zero) image distorts the activation histograms;
    - "drop": discarded.
    A stream is single-pass: once exhausted, `next_batch()` returns None for good, which is how a
    calibrator tells TensorRT that calibration is over.
    """

    REMAINDER_POLICIES = ("pad", "drop")

    def __init__(self, inputs: Iterable[np.ndarray], batch_size: int, remainder: str = "pad"):
        if batch_size < 1:
            raise ValueError(f"calibration batch size must be >= 1, got {batch_size}")
        if remainder not in self.REMAINDER_POLICIES:
            raise ValueError(f"remainder policy must be one of {self.REMAINDER_POLICIES}, got {remainder!r}")
        self.batch_size = batch_size
        self.remainder = remainder
        self.sample_shape: tuple[int, ...] | None = None
        self.images_read = 0  # images taken from `inputs`
        self.batches_served = 0
        self._source: Iterator[np.ndarray] = iter(inputs)
        self._pending: list[np.ndarray] = []  # arrays read but not yet served, in order
        self._pending_images = 0
        self._exhausted = False

    def next_batch(self) -> np.ndarray | None:
        """The next (batch_size, C, H, W) float32 batch, or None once the stream is exhausted."""
        while self._pending_images < self.batch_size and not self._exhausted:
            try:
                self._take(next(self._source))
            except StopIteration:
                self._exhausted = True
        if self._pending_images >= self.batch_size:
            return self._serve(self._cut(self.batch_size))
        if self._pending_images == 0 or self.remainder == "drop":
            self._pending, self._pending_images = [], 0
            return None
        rest = self._cut(self._pending_images)
        return self._serve(rest[np.arange(self.batch_size) % len(rest)])

    def __iter__(self) -> Iterator[np.ndarray]:
        while (batch := self.next_batch()) is not None:
            yield batch

    def _take(self, array: np.ndarray) -> None:
        array = np.asarray(array, dtype=np.float32)
        if array.ndim != 4:
            raise ValueError(f"calibration inputs must be (N, C, H, W) arrays, got shape {array.shape}")
        if self.sample_shape is None:
            self.sample_shape = tuple(array.shape[1:])
        elif tuple(array.shape[1:]) != self.sample_shape:
            raise ValueError(f"calibration input of shape {array.shape[1:]} after inputs of shape {self.sample_shape}")
        if len(array):
            self._pending.append(array)
            self._pending_images += len(array)
            self.images_read += len(array)

    def _cut(self, count: int) -> np.ndarray:
        """The first `count` pending images as one array; the rest stays pending."""
        joined = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        head, tail = joined[:count], joined[count:]
        self._pending = [tail] if len(tail) else []
        self._pending_images = len(tail)
        return head

    def _serve(self, batch: np.ndarray) -> np.ndarray:
        self.batches_served += 1
        return np.ascontiguousarray(batch, dtype=np.float32)


@dataclass(frozen=True)
class CalibrationCache:
    """TensorRT's calibration cache file, valid only for the `key` it was written with.

    The key names what the scales were computed from (model, preprocessing, calibration images);
    a cache written for another key is ignored, so a changed model is always recalibrated.
    """

    path: Path
    key: str

    @property
    def key_path(self) -> Path:
        return self.path.with_name(self.path.name + ".key")

    def read(self) -> bytes | None:
        try:
            if self.key_path.read_text().strip() != self.key:
                return None
            data = self.path.read_bytes()
        except OSError:
            return None
        return data or None

    def write(self, data: bytes) -> None:
        _atomic_write(self.path, bytes(data))
        _atomic_write(self.key_path, (self.key + "\n").encode())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- TensorRT calls
def import_tensorrt():
    """The `tensorrt` module, or a BackendError saying precisely why it is not usable here."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not
        raise BackendError(
            f"TensorRT is not installed: `import tensorrt` failed ({type(e).__name__}: {e}). "
            "Install a TensorRT 10.x wheel for this CUDA (e.g. tensorrt-cu13 from NVIDIA's index, or bring it "
            "in wheels/ for bench/gpu_check.sh); CPU-only machines cannot run this backend") from e
    if not hasattr(trt, "Builder"):
        raise BackendError(f"TensorRT is not installed: `import tensorrt` gave a module without Builder "
                           f"({getattr(trt, '__file__', '?')}): a stub or bindings-only package, not the runtime")
    return trt


def _builder_flag(trt, name: str):
    try:
        return getattr(trt.BuilderFlag, name)
    except AttributeError:
        raise BackendError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}: weakly-typed precision flags were "
                           "removed in TensorRT 11 (explicit quantization / strong typing replace them); this "
                           "backend targets TensorRT 10.x") from None


def make_entropy_calibrator(stream: CalibrationStream, cache: CalibrationCache, device: str = "cuda"):
    """An `IInt8EntropyCalibrator2` fed by `stream` through one torch CUDA buffer.

    The class is defined here, not at module level, because its base class needs tensorrt.
    An error inside a TensorRT callback cannot propagate through TensorRT, so it is kept in
    `.error` (and ends the calibration) for `build_engine` to raise afterwards.
    """
    trt = import_tensorrt()
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind11 trampolines need the explicit base init
            self.stream = stream
            self.cache = cache
            self.error: BaseException | None = None
            self.cache_hit = False
            self._device_batch = None  # allocated on the first batch, once the sample shape is known

        def get_batch_size(self) -> int:
            return self.stream.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                batch = self.stream.next_batch()
                if batch is None:
                    return None
                if self._device_batch is None:
                    self._device_batch = torch.empty(batch.shape, dtype=torch.float32, device=device)
                self._device_batch.copy_(torch.from_numpy(batch))
                # TensorRT reads the buffer on its own stream: the copy must be complete
                torch.cuda.current_stream(self._device_batch.device).synchronize()
                return [int(self._device_batch.data_ptr())] * len(names)
            except BaseException as e:  # noqa: BLE001 - kept and re-raised by build_engine
                self.error = e
                return None

        def read_calibration_cache(self) -> bytes | None:
            data = self.cache.read()
            self.cache_hit = data is not None
            return data

        def write_calibration_cache(self, data) -> None:
            try:
                self.cache.write(bytes(data))
            except BaseException as e:  # noqa: BLE001
                self.error = e

    return EntropyCalibrator()


def _explicit_batch_flags(trt) -> int:
    """Network creation flags: explicit batch. TensorRT 10 networks are always explicit-batch and the
    flag is deprecated there (ignored); older versions need it set."""
    if int(trt.__version__.split(".")[0]) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _strongly_typed_flag(trt) -> int:
    """The network creation flag for a strongly typed network (TensorRT >= 9.1)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise BackendError(f"TensorRT {trt.__version__} has no strongly typed networks, which fp8 (FP8 Q/DQ) "
                           "builds use; this backend targets TensorRT 10.x")
    return 1 << int(flag)


def gpu_compute_capability(device: str = "cuda") -> tuple[int, int]:
    import torch

    if not torch.cuda.is_available():
        raise BackendError("tensorrt backend: no CUDA device is available")
    return torch.cuda.get_device_capability(torch.device(device))


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str, profile: ProfileSpec,
                 timing_cache_path: str | Path | None, calibrator=None, workspace_gib: float = 4,
                 device: str = "cuda") -> dict[str, Any]:
    """Build a serialized engine from `onnx_path` into `engine_path`; returns what the build did.

    The timing cache (measured tactic timings) is loaded when `timing_cache_path` exists and saved
    after the build, so rebuilds on the same GPU and TensorRT version skip most autotuning.
    """
    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    flags = precision_flags(precision, gpu_compute_capability(device))
    check_quantization(precision, onnx_path, calibrator is not None)
    started = time.perf_counter()
    # FP8 Q/DQ graphs build as strongly typed networks, as TensorRT recommends (its ONNX parser warns
    # about weak typing for Q/DQ other than INT8): every tensor keeps its ONNX type (float8 between
    # Q and DQ, float32 elsewhere) and no precision flag may be set; `flags` only checked the GPU.
    strongly_typed = precision == "fp8"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_explicit_batch_flags(trt) | (_strongly_typed_flag(trt) if strongly_typed else 0))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weight data is found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"tensorrt backend: cannot parse {onnx_path}: {errors or 'no parser errors reported'}")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise BackendError(f"tensorrt backend: expected one input and one output, got "
                           f"{network.num_inputs} and {network.num_outputs} in {onnx_path}")
    input_name = network.get_input(0).name

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default; fp32 must mean fp32
    for name in ([] if strongly_typed else flags):
        config.set_flag(_builder_flag(trt, name))
    optimisation_profile = builder.create_optimization_profile()
    optimisation_profile.set_shape(input_name, *profile.shapes)
    config.add_optimization_profile(optimisation_profile)
    if calibrator is not None:
        if not hasattr(config, "int8_calibrator"):
            raise BackendError(f"TensorRT {trt.__version__} has no INT8 calibrators (removed in 11.0); use a Q/DQ ONNX")
        # calibration runs at the calibration profile's opt shape, so pin it to the calibration batch
        calib_shape = (calibrator.get_batch_size(), *profile.opt[1:])
        calibration_profile = builder.create_optimization_profile()
        calibration_profile.set_shape(input_name, calib_shape, calib_shape, calib_shape)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(calibration_profile)

    timing_cache_path = Path(timing_cache_path) if timing_cache_path else None
    previous_cache = timing_cache_path.read_bytes() if timing_cache_path and timing_cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(previous_cache)
    if not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        # a cache from another GPU or TensorRT version: start afresh rather than mix timings
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
        previous_cache = b""

    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None and getattr(calibrator, "error", None) is not None:
        raise BackendError(f"tensorrt backend: INT8 calibration failed: {calibrator.error}") from calibrator.error
    if serialized is None:
        raise BackendError(f"tensorrt backend: building the {precision} engine from {onnx_path} failed "
                           "(see the TensorRT log above)")
    _atomic_write(engine_path, bytes(memoryview(serialized)))
    if timing_cache_path:
        _atomic_write(timing_cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    result = {"tensorrt": trt.__version__, "precision": precision, "builder_flags": [] if strongly_typed else flags,
              "strongly_typed": strongly_typed,
              "profile": [list(s) for s in profile.shapes], "workspace_gib": workspace_gib,
              "build_s": round(time.perf_counter() - started, 3), "timing_cache_reused": bool(previous_cache)}
    if calibrator is not None:
        result["calibration"] = {"cache_hit": calibrator.cache_hit, "batches": calibrator.stream.batches_served,
                                 "images": calibrator.stream.images_read, "batch_size": calibrator.stream.batch_size,
                                 "remainder": calibrator.stream.remainder}
    return result


# ----------------------------------------------------------------------------- runtime
@dataclass
class _EngineGraph:
    """One batch size: its own execution context, static buffers and captured CUDA graph."""

    batch_size: int
    context: Any
    static_input: Any
    static_output: Any
    graph: Any


class TensorRTBackend(Backend):
    """Runs a serialized engine (`model.engine`); builds one in a temporary folder when given weights
    or an ONNX file (fp32/tf32/fp16/bf16 only: INT8 needs `iws-engine build --calib`)."""

    name = "tensorrt"

    def __init__(self, precision: str = "fp32", device: str = "cuda", cuda_graphs: bool = True,
                 max_graphs: int = 16, max_padding: float = 2.0,
                 batch_profile: tuple[int, int, int] = DEFAULT_BATCH_PROFILE, workspace_gib: float = 4,
                 timing_cache_path: str | Path | None = None):
        if precision not in PRECISION_FLAGS:
            raise BackendError(f"tensorrt backend: unknown precision {precision!r} ({', '.join(PRECISION_FLAGS)})")
        self._trt = import_tensorrt()  # fail at creation, with the precise reason, not at first use
        if not device.startswith("cuda"):
            raise BackendError(f"tensorrt backend: runs on CUDA devices only, not {device!r} (use --device cuda)")
        super().__init__(precision, device)
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max_graphs
        self.max_padding = max_padding
        self.batch_profile = batch_profile
        self.workspace_gib = workspace_gib
        self.timing_cache_path = timing_cache_path
        self.graph_failures: dict[int, str] = {}  # batch size → why its capture failed (runs without a graph)
        self.build_info: dict[str, Any] | None = None
        self._graphs: dict[int, _EngineGraph] = {}

    # ----- protocol -----
    def _load_impl(self, model) -> None:
        import torch

        trt = self._trt
        if not torch.cuda.is_available():
            raise BackendError("tensorrt backend: no CUDA device is available")
        self._torch = torch
        self._device = torch.device(self.device)
        torch.cuda.set_device(self._device)  # TensorRT uses the current CUDA device
        if isinstance(model, (str, Path)) and Path(model).suffix in ENGINE_SUFFIXES:
            engine_bytes = Path(model).read_bytes()
        else:
            engine_bytes = self._build_in_process(model)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise BackendError("tensorrt backend: cannot deserialize the engine (built with another TensorRT "
                               f"version or for another GPU? this is TensorRT {trt.__version__})")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"tensorrt backend: expected one input and one output tensor, "
                               f"got {inputs} and {outputs}")
        self._input_name, self._output_name = inputs[0], outputs[0]
        self._input_dtype = self._torch_dtype(self._engine.get_tensor_dtype(self._input_name))
        self._output_dtype = self._torch_dtype(self._engine.get_tensor_dtype(self._output_name))
        self._output_tail = tuple(self._engine.get_tensor_shape(self._output_name))[1:]  # (-1, 1) → (1,)
        if int(np.prod(self._output_tail)) != int(np.prod(self.output_shape)):
            raise BackendError(f"tensorrt backend: engine output {self._output_tail} per image "
                               f"!= expected {self.output_shape or (1,)}")
        min_shape, _, max_shape = self._engine.get_tensor_profile_shape(self._input_name, 0)
        if tuple(max_shape)[1:] != self.input_shape:
            raise BackendError(f"tensorrt backend: engine input {tuple(max_shape)[1:]} "
                               f"!= model input {self.input_shape}")
        self._min_batch, self._max_batch = int(min_shape[0]), int(max_shape[0])
        self._stream = torch.cuda.Stream(self._device)
        # one device scratch area shared by every execution context: all enqueues and replays are
        # serialised on one stream, so the contexts never use it at the same time
        self._scratch = None
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None and hasattr(self._engine, "device_memory_size_v2"):
            self._scratch = torch.empty(max(1, self._engine.device_memory_size_v2), dtype=torch.uint8,
                                        device=self._device)
        self._dynamic_context = self._new_context()
        self._dynamic_input = self._dynamic_output = None
        self._graphs = {}

    def _infer_impl(self, batch, out) -> None:
        for start in range(0, len(out), self._max_batch):
            stop = min(len(out), start + self._max_batch)
            self._infer_chunk(batch[start:stop], out[start:stop])

    def _close_impl(self) -> None:
        # contexts before the engine, the engine before the runtime (TensorRT object lifetimes)
        self._graphs = {}
        self._dynamic_context = None
        self._dynamic_input = self._dynamic_output = None
        self._scratch = None
        self._engine = None
        self._runtime = None

    def versions(self) -> dict[str, str]:
        import torch

        return {"tensorrt": self._trt.__version__, "torch": torch.__version__, "cuda": torch.version.cuda or ""}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "cuda_graphs": self.cuda_graphs, "graph_batch_sizes": sorted(self._graphs),
                "graph_failures": dict(self.graph_failures), "build": self.build_info}

    # ----- helpers -----
    def _build_in_process(self, model) -> bytes:
        """Export (unless given an .onnx) and build into a temporary folder; returns the engine bytes."""
        from iws_engine.export.onnx import export_onnx

        if self.precision == "int8":
            raise BackendError("tensorrt backend: int8 needs calibration data: run `iws-engine build "
                               "--backend tensorrt --precision int8 --calib DIR` and load the artefact")
        with tempfile.TemporaryDirectory(prefix="iws-trt-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
                onnx_path = Path(model)
            else:
                export_onnx(model, onnx_path, input_shape=self.input_shape)
            engine_path = Path(tmp) / "model.engine"
            profile = ProfileSpec.from_batch(*self.batch_profile, self.input_shape)
            self.build_info = build_engine(onnx_path, engine_path, self.precision, profile, self.timing_cache_path,
                                           workspace_gib=self.workspace_gib, device=self.device)
            return engine_path.read_bytes()

    def _torch_dtype(self, trt_dtype):
        trt, torch = self._trt, self._torch
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        if hasattr(trt.DataType, "BF16"):
            table[trt.DataType.BF16] = torch.bfloat16
        try:
            return table[trt_dtype]
        except KeyError:
            raise BackendError(f"tensorrt backend: unsupported I/O tensor type {trt_dtype}") from None

    def _new_context(self):
        trt = self._trt
        if self._scratch is None:
            context = self._engine.create_execution_context()
        else:
            context = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise BackendError("tensorrt backend: cannot create an execution context (out of device memory?)")
        if self._scratch is not None:
            if hasattr(context, "set_device_memory"):  # 10.1+
                context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
            else:
                context.device_memory = self._scratch.data_ptr()
        return context

    def _bind(self, context, static_input, static_output) -> None:
        if not context.set_input_shape(self._input_name, tuple(static_input.shape)):
            raise BackendError(f"tensorrt backend: input shape {tuple(static_input.shape)} is outside the engine's "
                               f"profile (batch {self._min_batch}..{self._max_batch})")
        context.set_tensor_address(self._input_name, static_input.data_ptr())
        context.set_tensor_address(self._output_name, static_output.data_ptr())

    def _enqueue(self, context) -> None:
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise BackendError("tensorrt backend: execute_async_v3 failed (see the TensorRT log)")

    def _device_input(self, batch):
        return to_device_tensor(self._torch, batch, self._device)

    def _infer_chunk(self, batch, out) -> None:
        torch = self._torch
        n = len(out)
        caller = torch.cuda.current_stream(self._device)
        with torch.cuda.stream(self._stream), torch.inference_mode():
            self._stream.wait_stream(caller)  # device inputs written on the caller's stream are ready
            x = self._device_input(batch)
            size = self._graph_batch(n)
            graph = None if size is None else self._graphs.get(size) or self._capture(size)
            if graph is not None:
                graph.static_input[:n].copy_(x)  # rows n..size: stale, never read (rows are independent)
                graph.graph.replay()
                y = graph.static_output[:n]
            else:
                y = self._run_dynamic(x, n)
            write_output(y, out)  # to the host: waits for the stream; to a device tensor: ordered on it
        caller.wait_stream(self._stream)  # a device `out` is read on the caller's stream next

    def _graph_batch(self, n: int) -> int | None:
        """The batch size of the graph to replay (or capture) for `n` rows; None: run without a graph."""
        if not self.cuda_graphs:
            return None
        size = plan_graph_batch(max(n, self._min_batch), self._graphs, self.max_graphs, self.max_padding)
        if size is None or size > self._max_batch or size in self.graph_failures:
            return None  # a size whose capture failed once is not retried
        return size

    def _run_dynamic(self, x, n: int):
        """Without a graph: one shared context, buffers grown to the largest batch seen."""
        torch = self._torch
        rows = max(n, self._min_batch)
        if self._dynamic_input is None or len(self._dynamic_input) < rows:
            self._dynamic_input = torch.zeros((rows, *self.input_shape), dtype=self._input_dtype, device=self._device)
            self._dynamic_output = torch.empty((rows, *self._output_tail), dtype=self._output_dtype,
                                               device=self._device)
        static_input, static_output = self._dynamic_input[:rows], self._dynamic_output[:rows]
        static_input[:n].copy_(x)
        self._bind(self._dynamic_context, static_input, static_output)
        self._enqueue(self._dynamic_context)
        return static_output[:n]

    def _capture(self, batch_size: int) -> _EngineGraph | None:
        """A dedicated context, static buffers and a CUDA graph for `batch_size`; None when capture fails."""
        torch = self._torch
        context = self._new_context()
        static_input = torch.zeros((batch_size, *self.input_shape), dtype=self._input_dtype, device=self._device)
        static_output = torch.empty((batch_size, *self._output_tail), dtype=self._output_dtype, device=self._device)
        self._bind(context, static_input, static_output)
        # TensorRT defers some work after a shape change to the next enqueue: run it once outside capture
        self._enqueue(context)
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                self._enqueue(context)
        except (RuntimeError, BackendError) as e:  # e.g. an engine layer that cannot be stream-captured
            self.graph_failures[batch_size] = f"{type(e).__name__}: {e}"
            return None
        captured = _EngineGraph(batch_size, context, static_input, static_output, graph)
        self._graphs[batch_size] = captured
        return captured
