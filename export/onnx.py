"""ONNX export of the models (dynamic batch axis), validated with onnx.checker.

SAR_CNN goes through the legacy TorchScript exporter (opset 17): 0.1 s, exact, small enough to
live in memory. EVA02 (305 M parameters, 1.2 GB of fp32 weights) goes through the dynamo
exporter (opset 18) with its weights as external data next to the graph (`model.onnx.data`),
so the file stays far below protobuf's 2 GB limit and ONNX Runtime / TensorRT read the weights
straight from disk.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

OPSET = 17
DYNAMO_OPSET = 18
#: the largest batch the exported graph declares (the dynamic axis needs a bound for torch.export)
MAX_EXPORT_BATCH = 65536
OUTPUT_NAMES = {"sarcnn": "logit", "eva02": "features"}


def export_onnx(model, path: str | Path, *, input_shape=(1, 256, 256)) -> Path:
    """Export an eval-mode model with a dynamic batch axis to `path` (EVA02: plus `path`.data); returns `path`."""
    from iws_engine.export.models import is_eva02

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_eva02(model):
        return _export_dynamo(model, path, input_shape)
    path.write_bytes(sarcnn_onnx_bytes(model, input_shape=input_shape))
    return path


def sarcnn_onnx_bytes(model, *, input_shape=(1, 256, 256), opset: int = OPSET) -> bytes:
    """SAR_CNN as ONNX bytes, in memory (legacy exporter, dynamic batch), checked with onnx.checker."""
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
            output_names=[OUTPUT_NAMES["sarcnn"]],
            dynamic_axes={"input": {0: "batch"}, OUTPUT_NAMES["sarcnn"]: {0: "batch"}},
            opset_version=opset,
            dynamo=False,  # the legacy exporter: 0.1 s for SAR_CNN, exact dynamic batch
        )
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


def _export_dynamo(model, path: Path, input_shape) -> Path:
    """EVA02 through torch.export + the dynamo exporter, weights as external data, dynamic batch."""
    import onnx
    import torch

    from iws_engine.export.models import build_model

    net = build_model(model).float().cpu()
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)  # the exporter appends to an existing data file
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export internals, not ours
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["input"],
            output_names=[OUTPUT_NAMES["eva02"]],
            dynamic_shapes={"x": {0: batch}},
            opset_version=DYNAMO_OPSET,
            dynamo=True,
            external_data=True,
            optimize=True,
            verbose=False,
        )
    onnx.checker.check_model(str(path), full_check=True)  # by path: the checker follows the external data
    return path


@contextmanager
def onnx_session_source(model, input_shape) -> Iterator[str | bytes]:
    """What an ONNX Runtime session is created from: an .onnx path as is (its external data beside
    it), SAR_CNN weights as in-memory bytes, EVA02 weights exported into a temporary folder that
    lives until the session has read it."""
    from iws_engine.export.models import is_eva02

    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        yield str(model)
    elif is_eva02(model):
        with tempfile.TemporaryDirectory(prefix="iws-onnx-") as tmp:
            yield str(export_onnx(model, Path(tmp) / "model.onnx", input_shape=input_shape))
    else:
        yield sarcnn_onnx_bytes(model, input_shape=input_shape)
