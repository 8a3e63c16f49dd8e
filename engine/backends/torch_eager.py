"""Eager PyTorch: the baseline every speed-up is measured against (fp32; fp16/bf16 autocast optional)."""

from __future__ import annotations

from iws_engine.backends.base import Backend, BackendError, cpu_cores
from iws_engine.backends.torch_support import strict_fp32, to_device_tensor, write_output

_AUTOCAST = {"fp16": "float16", "bf16": "bfloat16"}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, precision: str = "fp32", device: str = "cpu", channels_last: bool = False, threads: int | None = None):
        if precision not in ("fp32", *_AUTOCAST):
            raise BackendError(f"torch backend: unsupported precision {precision!r} (fp32, fp16, bf16)")
        super().__init__(precision, device)
        self.channels_last = channels_last
        self.threads = threads

    def _load_impl(self, model) -> None:
        import torch

        from iws_engine.export.models import build_model

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("torch backend: CUDA requested but no CUDA device is available")
        if self.device == "cpu":
            torch.set_num_threads(self.threads or cpu_cores())
        self._torch = torch
        net = build_model(model).to(self.device).eval()
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self._net = net

    def _infer_impl(self, batch, out) -> None:
        torch = self._torch
        x = to_device_tensor(torch, batch, self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.precision == "fp32":
                with strict_fp32(torch):
                    y = self._net(x)
            else:
                dtype = getattr(torch, _AUTOCAST[self.precision])
                with torch.autocast(device_type=x.device.type, dtype=dtype):
                    y = self._net(x)
        write_output(y, out)

    def versions(self) -> dict[str, str]:
        import torch

        v = {"torch": torch.__version__}
        if torch.cuda.is_available():
            v["cuda"] = torch.version.cuda or ""
        return v
