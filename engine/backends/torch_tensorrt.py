"""Torch-TensorRT, dynamo path: `torch_tensorrt.compile(ir="dynamo")` with a dynamic batch profile.

Written against the Torch-TensorRT 2.x docs (dynamo frontend, `torch_tensorrt.save/load` with
`output_format="exported_program"`); not yet run (no TensorRT on our machines: Torch-TensorRT
needs libnvinfer).

The compiled program is saved as an ExportedProgram (`model.ep`, TensorRT engines embedded) by
`iws-engine build --backend torch-tensorrt` and loaded without recompiling; given weights, the
backend compiles in process. fp32/fp16/bf16 only: INT8/FP8 need explicit quantization (NVIDIA
ModelOpt), which this project does not produce.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from iws_engine.backends.base import Backend, BackendError
from iws_engine.backends.torch_support import to_device_tensor, write_output

PROGRAM_SUFFIX = ".ep"
DEFAULT_BATCH_PROFILE = (1, 64, 4096)
#: torch dtypes TensorRT may choose kernels in, per precision (the I/O stays fp32)
_ENABLED_PRECISIONS = {"fp32": ("float32",), "fp16": ("float16", "float32"), "bf16": ("bfloat16", "float32")}


def import_torch_tensorrt():
    """The `torch_tensorrt` module, or a BackendError saying precisely why it is not usable here."""
    try:
        import torch_tensorrt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not
        import torch

        raise BackendError(
            f"Torch-TensorRT is not installed: `import torch_tensorrt` failed ({type(e).__name__}: {e}). "
            f"It needs TensorRT (libnvinfer) and a torch-tensorrt wheel built for torch {torch.__version__}; "
            "CPU-only machines cannot run this backend") from e
    return torch_tensorrt


def compile_program(net, input_shape: tuple[int, ...], precision: str, batch_profile: tuple[int, int, int],
                    device: str = "cuda", workspace_gib: float = 4):
    """Compile an eval-mode module with a dynamic batch (min, opt, max) for `input_shape` (C, H, W)."""
    import torch

    ttrt = import_torch_tensorrt()
    lo, opt, hi = batch_profile
    spec = ttrt.Input(min_shape=(lo, *input_shape), opt_shape=(opt, *input_shape), max_shape=(hi, *input_shape),
                      dtype=torch.float32)
    precisions = {getattr(torch, name) for name in _ENABLED_PRECISIONS[precision]}
    net = net.to(device).float().eval()
    return ttrt.compile(net, ir="dynamo", inputs=[spec], enabled_precisions=precisions,
                        workspace_size=int(workspace_gib * (1 << 30)))


def save_program(compiled, path: str | Path, example) -> None:
    """Save a compiled program as an ExportedProgram file.

    `retrace=False` where the installed version has it: a retrace from one example tensor would
    specialise the batch size, while the compiled graph already carries the dynamic batch.
    """
    ttrt = import_torch_tensorrt()
    parameters = inspect.signature(ttrt.save).parameters
    kwargs: dict[str, Any] = {"output_format": "exported_program"}
    kwargs["arg_inputs" if "arg_inputs" in parameters else "inputs"] = [example]
    if "retrace" in parameters:
        kwargs["retrace"] = False
    ttrt.save(compiled, str(path), **kwargs)


def load_program(path: str | Path):
    """A callable module from a saved ExportedProgram (no recompilation)."""
    ttrt = import_torch_tensorrt()
    if hasattr(ttrt, "load"):
        program = ttrt.load(str(path))
    else:
        import torch

        program = torch.export.load(str(path))
    return program.module() if hasattr(program, "module") else program


class TorchTensorRTBackend(Backend):
    name = "torch-tensorrt"

    def __init__(self, precision: str = "fp32", device: str = "cuda",
                 batch_profile: tuple[int, int, int] = DEFAULT_BATCH_PROFILE, workspace_gib: float = 4):
        if precision not in _ENABLED_PRECISIONS:
            raise BackendError(f"torch-tensorrt backend: unsupported precision {precision!r} "
                               f"({', '.join(_ENABLED_PRECISIONS)}; int8/fp8 need explicit quantization)")
        self._ttrt = import_torch_tensorrt()  # fail at creation, with the precise reason
        if not device.startswith("cuda"):
            raise BackendError(f"torch-tensorrt backend: runs on CUDA devices only, not {device!r} (use --device cuda)")
        super().__init__(precision, device)
        self.batch_profile = batch_profile
        self.workspace_gib = workspace_gib

    def _load_impl(self, model) -> None:
        import torch

        from iws_engine.export.models import build_model

        if not torch.cuda.is_available():
            raise BackendError("torch-tensorrt backend: no CUDA device is available")
        self._torch = torch
        self._device = torch.device(self.device)
        if isinstance(model, (str, Path)) and Path(model).suffix == PROGRAM_SUFFIX:
            self._module = load_program(model)
            self._max_batch = None  # the saved program enforces its own profile
        else:
            self._module = compile_program(build_model(model), self.input_shape, self.precision, self.batch_profile,
                                           self.device, self.workspace_gib)
            self._max_batch = self.batch_profile[2]

    def _infer_impl(self, batch, out) -> None:
        step = self._max_batch or len(out)
        for start in range(0, len(out), step):
            stop = min(len(out), start + step)
            x = self._device_input(batch[start:stop])
            with self._torch.inference_mode():
                y = self._module(x)
            write_output(y, out[start:stop])

    def _close_impl(self) -> None:
        self._module = None

    def versions(self) -> dict[str, str]:
        import torch

        v = {"torch-tensorrt": self._ttrt.__version__, "torch": torch.__version__, "cuda": torch.version.cuda or ""}
        try:
            import tensorrt

            v["tensorrt"] = tensorrt.__version__
        except ImportError:
            pass
        return v

    def _device_input(self, batch):
        return to_device_tensor(self._torch, batch, self._device).to(self._torch.float32).contiguous()
