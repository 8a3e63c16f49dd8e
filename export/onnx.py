"""ONNX export of the models (dynamic batch axis), validated with onnx.checker."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

OPSET = 17


def export_onnx(model, path: str | Path | None = None, *, input_shape=(1, 256, 256), opset: int = OPSET) -> bytes:
    """Export an eval-mode model with a dynamic batch axis; returns the ONNX bytes (also written to `path`)."""
    import onnx
    import torch

    from iws_engine.export.models import build_model

    net = build_model(model).float().cpu()
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated, still exact here
        torch.onnx.export(
            net,
            (example,),
            buf,
            input_names=["input"],
            output_names=["logit"],
            dynamic_axes={"input": {0: "batch"}, "logit": {0: "batch"}},
            opset_version=opset,
            dynamo=False,  # the legacy exporter: 0.1 s for SAR_CNN, exact dynamic batch
        )
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data


def onnx_bytes_for(model) -> bytes:
    """ONNX bytes for `model`: an .onnx path is read as is; weights are exported in memory."""
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        return Path(model).read_bytes()
    return export_onnx(model)
