"""Pieces the torch-based GPU backends (inductor, tensorrt, torch-tensorrt) share."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Collection, Iterator

import numpy as np


def plan_graph_batch(n: int, captured: Collection[int], max_graphs: int, max_padding: float = 2.0) -> int | None:
    """The batch size of the CUDA graph that should serve a batch of `n`, or None for no graph.

    An exact captured size wins; else the smallest captured size that pads `n` by at most
    `max_padding`×; else `n` itself (a new graph) while fewer than `max_graphs` exist.
    """
    if n in captured:
        return n
    padded = [size for size in captured if n < size <= n * max_padding]
    if padded:
        return min(padded)
    return n if len(captured) < max_graphs else None


def to_device_tensor(torch: Any, batch: Any, device: Any):
    """`batch` (NumPy, torch tensor or a `__cuda_array_interface__` array) as a torch tensor on `device`.

    Arrays already on the device are viewed, never copied through the host.
    """
    if isinstance(batch, torch.Tensor):
        x = batch
    elif hasattr(batch, "__cuda_array_interface__"):
        x = torch.as_tensor(batch, device=device)
    else:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    return x.to(device, non_blocking=True)


def write_output(y: Any, out: Any) -> None:
    """Copy a torch result `y` (N, 1) or (N, K) into `out`: a NumPy array (through the host) or a torch
    tensor (a device-to-device copy when both are on the GPU). Either way the copy is ordered on the
    current stream; a NumPy destination waits for it."""
    if isinstance(out, np.ndarray):
        out[...] = y.reshape(out.shape).float().cpu().numpy()
    else:
        out.copy_(y.reshape(out.shape))


@contextmanager
def strict_fp32(torch: Any) -> Iterator[None]:
    """fp32 that means fp32 on CUDA: no TF32 in matmuls or cuDNN convolutions (PyTorch lets cuDNN use
    TF32 by default), restored afterwards. The eager fp32 baseline and parity references run in it."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
