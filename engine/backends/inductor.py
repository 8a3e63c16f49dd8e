"""TorchInductor (`torch.compile`): compiled kernels, reduced precision and CUDA-graph replay.

On CUDA the module is converted to fp16/bf16 (weights and inputs, not autocast: no per-op casts
at run time) and compiled for static shapes; each batch size gets one CUDA graph, captured after
warm-up into static input/output buffers and replayed for every later batch of that size, so a
batch costs one graph launch instead of hundreds of kernel launches. A partial batch is padded up
to a captured size when that wastes at most `max_padding`× the work, else it gets a graph of its
own (up to `max_graphs`), else it runs through the compiled module without a graph. On the CPU
there are no graphs: `torch.compile` alone (CI tests this path), and fp16/bf16 run under autocast
with fp32 weights (convolutions and matmuls in the low precision, BatchNorm and reductions in fp32):
converting SAR_CNN wholesale to bf16 misses the bf16 parity gate on the real IWS checkpoint (max
|dp| 0.0076 > 5e-3 on the 48 probes: BatchNorm in bf16), autocast meets it (0.0027).

Inputs may be host NumPy arrays, torch tensors, or device arrays exposing
`__cuda_array_interface__` (CuPy, Numba): device inputs are used in place, never copied through
the host.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from iws_engine.backends.base import Backend, BackendError, cpu_cores
from iws_engine.backends.torch_support import plan_graph_batch, to_device_tensor, write_output

#: torch.compile modes; the two marked below capture their own CUDA graphs (cudagraph trees).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MODES_WITH_OWN_CUDA_GRAPHS = ("reduce-overhead", "max-autotune")
#: the default mode per device type; `IWS_INDUCTOR_MODE` overrides it (recorded in info()) so a
#: benchmark script can pick a mode without a new CLI flag.
DEFAULT_MODE = {"cuda": "max-autotune-no-cudagraphs", "cpu": "default"}
MODE_ENV = "IWS_INDUCTOR_MODE"
PRECISIONS = ("fp32", "fp16", "bf16")
_TORCH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: enough distinct batch sizes for a sweep plus partial batches, for several backends in one
#: process; dynamo's default (8 per code object, shared by every compiled SarCNN) is too few.
RECOMPILE_LIMIT = 64


@dataclass
class _CapturedGraph:
    """One CUDA graph with the static buffers it reads and writes."""

    batch_size: int
    graph: Any  # torch.cuda.CUDAGraph
    static_input: Any  # torch.Tensor (batch_size, C, H, W), compute dtype
    static_output: Any  # torch.Tensor (batch_size, 1)


class InductorBackend(Backend):
    name = "inductor"

    @property
    def input_dtype(self) -> str:
        """bf16 takes bfloat16 batches as they are: the model's first op, a convolution, casts its input to bfloat16
        (autocast on the CPU, the converted module on CUDA) with the same round-to-nearest-even the loader applies,
        so a bfloat16 batch gives the scores of its float32 original."""
        return "bfloat16" if self.precision == "bf16" else "float32"

    def __init__(self, precision: str = "fp32", device: str = "cpu", mode: str | None = None,
                 channels_last: bool = False, cuda_graphs: bool | None = None, max_graphs: int = 16,
                 max_padding: float = 2.0, dynamic: bool | None = None, threads: int | None = None):
        if precision not in PRECISIONS:
            raise BackendError(f"inductor backend: unsupported precision {precision!r} ({', '.join(PRECISIONS)})")
        on_cuda = device.startswith("cuda")
        mode = mode or os.environ.get(MODE_ENV) or DEFAULT_MODE["cuda" if on_cuda else "cpu"]
        if mode not in COMPILE_MODES:
            raise BackendError(f"inductor backend: unknown torch.compile mode {mode!r} ({', '.join(COMPILE_MODES)})")
        if cuda_graphs and not on_cuda:
            raise BackendError("inductor backend: CUDA graphs need a CUDA device")
        if cuda_graphs and mode in MODES_WITH_OWN_CUDA_GRAPHS:
            raise BackendError(f"inductor backend: mode {mode!r} captures its own CUDA graphs; "
                               "use cuda_graphs=False with it, or mode 'max-autotune-no-cudagraphs'")
        super().__init__(precision, device)
        self.mode = mode
        self.channels_last = channels_last
        # our own per-batch-size graphs, unless the compile mode already captures graphs
        self.cuda_graphs = on_cuda and mode not in MODES_WITH_OWN_CUDA_GRAPHS if cuda_graphs is None else cuda_graphs
        self.max_graphs = max_graphs
        self.max_padding = max_padding
        # static shapes on CUDA for small models (one specialised kernel set per captured batch
        # size); dynamo's automatic dynamic shapes (at most two compiles) on the CPU and for EVA02,
        # whose compile takes minutes per shape: decided at load when None
        self._dynamic_option = dynamic
        self.dynamic = dynamic
        self.threads = threads
        self.graph_failures: dict[int, str] = {}  # batch size → why its capture failed (runs without a graph)
        self._graphs: dict[int, _CapturedGraph] = {}

    # ----- protocol -----
    def _load_impl(self, model) -> None:
        import torch

        from iws_engine.export.models import build_model, is_eva02

        on_cuda = self.device.startswith("cuda")
        if on_cuda and not torch.cuda.is_available():
            raise BackendError("inductor backend: CUDA requested but no CUDA device is available")
        if not on_cuda:
            torch.set_num_threads(self.threads or cpu_cores())
        self._torch = torch
        self._device = torch.device(self.device)
        compute_dtype = getattr(torch, _TORCH_DTYPE[self.precision])
        self._compute_dtype = compute_dtype
        self.autocast = not on_cuda and self.precision != "fp32"
        # the dtype inputs and weights are held in: fp32 under autocast, else the compute dtype
        self._dtype = torch.float32 if self.autocast else compute_dtype
        self._memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if self._dynamic_option is None:
            self.dynamic = False if on_cuda and not is_eva02(model) else None
        net = build_model(model).to(device=self._device, dtype=self._dtype).eval()
        net = net.to(memory_format=self._memory_format)
        self._net = net
        if self.autocast:
            def forward(x, net=net):
                with torch.autocast("cpu", dtype=compute_dtype):
                    return net(x)

            self._compiled = torch.compile(forward, mode=self.mode, dynamic=self.dynamic)
        else:
            self._compiled = torch.compile(net, mode=self.mode, dynamic=self.dynamic)
        self._graphs = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # compiled calls and graph replays run on one side stream, ordered after the caller's stream
        self._stream = torch.cuda.Stream(self._device) if on_cuda else None

    def _infer_impl(self, batch, out) -> None:
        torch = self._torch
        n = int(batch.shape[0])
        if self._stream is None:
            with torch.inference_mode(), self._compile_limits():
                y = self._compiled(self._device_input(batch))
            write_output(y, out)
            return
        caller = torch.cuda.current_stream(self._device)
        with torch.cuda.stream(self._stream), torch.inference_mode():
            self._stream.wait_stream(caller)  # device inputs written on the caller's stream are ready
            x = self._device_input(batch)
            size = self._graph_batch(n)
            graph = None if size is None else self._graphs.get(size) or self._capture(size)
            if graph is None:
                with self._compile_limits():
                    y = self._compiled(x)
            else:
                # rows n..size of a padded batch hold stale inputs: the models treat rows
                # independently (eval mode, no batch statistics), and their outputs are never read
                graph.static_input[:n].copy_(x)
                graph.graph.replay()
                y = graph.static_output[:n]
            write_output(y, out)  # to the host: waits for the stream; to a device tensor: ordered on it
        caller.wait_stream(self._stream)  # a device `out` is read on the caller's stream next

    def _close_impl(self) -> None:
        self._graphs = {}
        self._compiled = None
        self._net = None
        self._graph_pool = None
        self._stream = None

    def versions(self) -> dict[str, str]:
        import torch

        v = {"torch": torch.__version__}
        if self.device.startswith("cuda"):
            v["cuda"] = torch.version.cuda or ""
            try:
                import triton

                v["triton"] = triton.__version__
            except ImportError:
                pass
        return v

    def info(self) -> dict[str, Any]:
        return {**super().info(), "compile_mode": self.mode, "dynamic": self.dynamic,
                "autocast": getattr(self, "autocast", False),
                "channels_last": self.channels_last, "cuda_graphs": self.cuda_graphs, "graph_batch_sizes": sorted(self._graphs),
                "graph_failures": dict(self.graph_failures)}

    # ----- helpers -----
    def _device_input(self, batch):
        """`batch` as a tensor on this backend's device in the compute dtype and memory format."""
        # transfer first, then cast on the device (a host-side cast of a large batch is slow); under autocast a
        # batch already in the compute dtype stays in it (the first convolution would cast it there anyway)
        x = to_device_tensor(self._torch, batch, self._device)
        x = x if self.autocast and x.dtype == self._compute_dtype else x.to(self._dtype)
        return x.contiguous(memory_format=self._memory_format)

    def _compile_limits(self) -> AbstractContextManager:
        """Dynamo settings for compiled calls: room for every batch size, and an error rather than
        a silent eager fallback when that room runs out (it would make 'inductor' timings lie)."""
        import torch._dynamo.config as dynamo_config

        wanted = {"recompile_limit": RECOMPILE_LIMIT, "fail_on_recompile_limit_hit": True}
        present = {k: v for k, v in wanted.items() if hasattr(dynamo_config, k)}
        return dynamo_config.patch(present) if present else nullcontext()

    def _graph_batch(self, n: int) -> int | None:
        """The batch size of the graph to replay (or capture) for `n` rows; None: run without a graph."""
        if not self.cuda_graphs:
            return None
        size = plan_graph_batch(n, self._graphs, self.max_graphs, self.max_padding)
        return None if size in self.graph_failures else size  # a failed capture is not retried

    def _capture(self, batch_size: int, warmup: int = 2) -> _CapturedGraph | None:
        """Compile and warm up for `batch_size` on the side stream, then capture one CUDA graph.

        Compilation errors propagate; a capture that fails (an op that cannot be captured) is
        recorded in `graph_failures` and that batch size runs without a graph (None).
        """
        torch = self._torch
        shape = (batch_size, *self.input_shape)
        static_input = torch.zeros(shape, device=self._device, dtype=self._dtype).contiguous(
            memory_format=self._memory_format)
        with self._compile_limits():
            for _ in range(warmup):  # compilation, autotuning and lazy CUDA initialisation happen here
                self._compiled(static_input)
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                # One pool for all graphs: replays are serialised on one stream and each output is
                # copied out right after its replay, so graphs reusing each other's memory is safe.
                with torch.cuda.graph(graph, pool=self._graph_pool, stream=self._stream):
                    static_output = self._compiled(static_input)
            except RuntimeError as e:
                self.graph_failures[batch_size] = f"{type(e).__name__}: {e}"
                return None
        captured = _CapturedGraph(batch_size, graph, static_input, static_output)
        self._graphs[batch_size] = captured
        return captured
