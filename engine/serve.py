"""`iws-engine serve`: the engine over HTTP, speaking the KServe v2 inference protocol as Triton does.

    iws-engine serve --port 8000                      # loopback only; --host 0.0.0.0 must be asked for

    GET  /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}[/versions/1], .../ready, .../config
    POST /v2/models/{name}[/versions/1]/infer         input "png" (BYTES [N]) -> outputs score (FP32 [N], NaN
                                                      where failed), decision (INT8 [N], -1 where failed),
                                                      error (BYTES [N], empty where fine)
    GET  /metrics                                     Prometheus text format

Requests are JSON (a BYTES element is a base64 string, as PNG bytes are not UTF-8) or use Triton's binary
tensor extension (`Inference-Header-Content-Length`, `binary_data_size`; a BYTES tensor is each element's
4-byte little-endian length followed by its bytes), so the unchanged `tritonclient.http` client works.
Outputs are binary where the client asks (`binary_data` per output, `binary_data_output` for all).
Behind the server one BatchingClassifier batches the images of all concurrent requests together.

Request-level limits answer 4xx with a JSON {"error": ...}: body size (413), images per request (413),
a PNG whose IHDR declares more pixels than the loader's max_pixels (413: a decompression bomb is refused
like an oversized body), malformed JSON, headers or tensors (400), unknown model (404). A PNG that is
merely malformed gets its own error element; the other images of the request are scored. A full queue
answers 503. SIGTERM/SIGINT: stop accepting, finish the accepted requests, free the model, exit.
aiohttp is imported only here, inside the functions that run the server (the `serve` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import json
import math
import struct
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

from iws_engine import __version__
from iws_engine.argtypes import positive_int

INPUT_NAME = "png"
OUTPUTS = {"score": "FP32", "decision": "INT8", "error": "BYTES"}
MODEL_VERSION = "1"
DEFAULT_MAX_BODY_MB = 64
DEFAULT_MAX_IMAGES = 256
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
HEADER_LENGTH = "Inference-Header-Content-Length"


class RequestError(Exception):
    """A request the server refuses as a whole: HTTP `status` with `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Limits:
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * 1024 * 1024
    max_images: int = DEFAULT_MAX_IMAGES
    max_pixels: int | None = None  # None: the loader's max_pixels (one limit for the server and the decoder)


@dataclass
class InferRequest:
    """A parsed infer request: the PNGs, which outputs to return and how (binary or JSON)."""

    id: str | None
    images: list[bytes]
    outputs: dict[str, bool]  # output name -> binary
    timeout_s: float | None = None  # Triton's `timeout` parameter (microseconds) as a start deadline


# ----------------------------------------------------------------------------- protocol (pure functions)

def split_bytes_tensor(raw: bytes | memoryview, count: int, what: str) -> list[bytes]:
    """Triton's binary BYTES layout: per element a 4-byte little-endian length, then that many bytes."""
    raw = memoryview(raw)
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise RequestError(400, f"{what}: truncated BYTES element length at byte {offset}")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise RequestError(400, f"{what}: BYTES element {len(out)} declares {n} bytes, "
                                    f"{len(raw) - offset} remain")
        out.append(bytes(raw[offset:offset + n]))
        offset += n
    if len(out) != count:
        raise RequestError(400, f"{what}: shape says {count} elements, binary data holds {len(out)}")
    return out


def join_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def parse_infer_request(body: bytes, header_length: str | None, limits: Limits) -> InferRequest:
    """Decode a v2 infer request (JSON, or JSON + binary tensors); RequestError for what is wrong with it."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(400, f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise RequestError(400, f"{HEADER_LENGTH} {n} is outside the body's {len(body)} bytes")
        header, binary = body[:n], memoryview(body)[n:]
    else:
        header, binary = body, memoryview(b"")
    try:
        req = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"malformed JSON request header: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise RequestError(400, "the request must be a JSON object with an 'inputs' list")
    params = _parameters(req, "request")
    binary_default = bool(params.get("binary_data_output", False))
    timeout_s = None
    if "timeout" in params:  # Triton: microseconds
        if not isinstance(params["timeout"], (int, float)) or params["timeout"] < 0:
            raise RequestError(400, "parameter 'timeout' must be a non-negative number of microseconds")
        timeout_s = params["timeout"] / 1e6 if params["timeout"] > 0 else None

    images, offset = None, 0
    for tensor in req["inputs"]:
        if not isinstance(tensor, dict):
            raise RequestError(400, "each input must be a JSON object")
        tparams = _parameters(tensor, f"input {tensor.get('name')!r}")
        size = tparams.get("binary_data_size")
        if size is not None:  # binary tensors follow the JSON in input order
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise RequestError(400, f"input {tensor.get('name')!r}: binary_data_size {size!r} does not fit "
                                        f"the {len(binary) - offset} binary bytes left")
            raw, offset = binary[offset:offset + size], offset + size
        else:
            raw = None
        if tensor.get("name") != INPUT_NAME:
            raise RequestError(400, f"unknown input {tensor.get('name')!r}: this model takes one input "
                                    f"{INPUT_NAME!r} (BYTES, shape [N])")
        if tensor.get("datatype") != "BYTES":
            raise RequestError(400, f"input {INPUT_NAME!r} must be BYTES, not {tensor.get('datatype')!r}")
        shape = tensor.get("shape")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 2 or not all(isinstance(d, int) and d >= 0
                                                                              for d in shape)
                or (len(shape) == 2 and shape[1] != 1)):
            raise RequestError(400, f"input {INPUT_NAME!r}: shape must be [N] (or [N, 1]), got {shape!r}")
        count = shape[0]
        if count > limits.max_images:
            raise RequestError(413, f"{count} images in one request; the limit is {limits.max_images} (--max-images)")
        if raw is not None:
            images = split_bytes_tensor(raw, count, f"input {INPUT_NAME!r}")
        else:
            data = tensor.get("data")
            if not isinstance(data, list) or len(data) != count:
                raise RequestError(400, f"input {INPUT_NAME!r}: 'data' must be a list of {count} base64 strings "
                                        "(or send binary data)")
            if count and all(isinstance(e, list) and len(e) == 1 for e in data):  # shape [N, 1], nested
                data = [e[0] for e in data]
            images = []
            for i, element in enumerate(data):
                try:
                    images.append(base64.b64decode(element, validate=True))
                except (TypeError, ValueError, binascii.Error):
                    raise RequestError(400, f"input {INPUT_NAME!r}: element {i} is not a base64 string") from None
    if images is None:
        raise RequestError(400, f"the request has no input {INPUT_NAME!r}")
    if offset != len(binary):
        raise RequestError(400, f"{len(binary) - offset} binary bytes after the last binary tensor")

    requested = req.get("outputs")
    if requested is None:
        outputs = {name: binary_default for name in OUTPUTS}
    else:
        if not isinstance(requested, list):
            raise RequestError(400, "'outputs' must be a list")
        outputs = {}
        for o in requested:
            if not isinstance(o, dict) or o.get("name") not in OUTPUTS:
                name = o.get("name") if isinstance(o, dict) else o
                raise RequestError(400, f"unknown output {name!r}; outputs are {', '.join(OUTPUTS)}")
            oparams = _parameters(o, f"output {o['name']!r}")
            outputs[o["name"]] = bool(oparams.get("binary_data", binary_default))
    request_id = req.get("id")
    return InferRequest(None if request_id is None else str(request_id), images, outputs, timeout_s)


def _parameters(obj: dict, what: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(400, f"{what}: 'parameters' must be a JSON object")
    return params


def check_pixel_limit(images: list[bytes], max_pixels: int) -> None:
    """Refuse a request holding a PNG whose IHDR declares more than `max_pixels` (the loader's limit)."""
    from iws_engine.loaders.png import png_dimensions

    for i, data in enumerate(images):
        size = png_dimensions(data)
        if size is not None and size[0] * size[1] > max_pixels:
            raise RequestError(413, f"{INPUT_NAME}[{i}]: {size[0]}x{size[1]} = {size[0] * size[1]} pixels, above "
                                    f"the limit of {max_pixels} (--max-pixels)")


def encode_infer_response(model_name: str, request: InferRequest, rows) -> tuple[bytes, dict[str, str]]:
    """The v2 response body and headers for `rows` (one per image), binary where the request asked."""
    n = len(rows)
    values = {
        "score": np.array([r.score if r.ok else math.nan for r in rows], np.float32),
        "decision": np.array([r.decision if r.ok else -1 for r in rows], np.int8),
        "error": [(r.error or "").encode() for r in rows],
    }
    outputs, blobs = [], []
    for name, binary in request.outputs.items():
        tensor = {"name": name, "datatype": OUTPUTS[name], "shape": [n]}
        if binary:
            blob = (join_bytes_tensor(values[name]) if name == "error"
                    else values[name].astype(values[name].dtype.newbyteorder("<")).tobytes())
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif name == "error":
            tensor["data"] = [e.decode() for e in values[name]]
        else:
            tensor["data"] = values[name].tolist()  # NaN is written as NaN, as Triton's JSON does
        outputs.append(tensor)
    response = {"model_name": model_name, "model_version": MODEL_VERSION, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def prometheus_text(stats: dict, http_counts: dict[tuple[str, int], int], ready: bool) -> str:
    """The batcher's stats and HTTP counters in the Prometheus text exposition format."""
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                     for labels, value in samples)

    metric("iws_ready", "gauge", "1 while the server accepts inference requests.", [("", int(ready))])
    metric("iws_images_total", "counter", "Images accepted for inference.", [("", stats["requests"])])
    metric("iws_images_completed_total", "counter", "Images answered (scored or with an error).",
           [("", stats["completed"])])
    metric("iws_image_errors_total", "counter", "Images answered with an error (bad PNG, deadline, backend).",
           [("", stats["errors"])])
    metric("iws_image_timeouts_total", "counter", "Images that could not start before their deadline.",
           [("", stats["timeouts"])])
    metric("iws_batches_total", "counter", "Batches inferred.", [("", stats["batches"])])
    sizes = stats["batch_sizes"]
    buckets, total = [], 0
    for bound in BATCH_SIZE_BUCKETS:
        total = sum(v for k, v in sizes.items() if k <= bound)
        buckets.append((f'_bucket{{le="{bound}"}}', total))
    buckets.append(('_bucket{le="+Inf"}', stats["batches"]))
    lines.append("# HELP iws_batch_size Images per inferred batch.")
    lines.append("# TYPE iws_batch_size histogram")
    lines.extend(f"iws_batch_size{suffix} {v}" for suffix, v in buckets)
    lines.append(f"iws_batch_size_sum {sum(k * v for k, v in sizes.items())}")
    lines.append(f"iws_batch_size_count {stats['batches']}")
    metric("iws_queue_depth", "gauge", "Images waiting to start.", [("", stats["queue_depth"])])
    metric("iws_in_flight", "gauge", "Images decoding, waiting for a batch or inferring.", [("", stats["in_flight"])])
    latency = stats["latency_ms"]
    metric("iws_image_latency_seconds", "summary",
           "Submit-to-result latency per image over the last 10,000 images.",
           [(f'{{quantile="{q}"}}', (latency[p] / 1000.0) if latency[p] is not None else math.nan)
            for q, p in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))])
    metric("iws_http_requests_total", "counter", "HTTP requests by endpoint and status code.",
           [(f'{{endpoint="{ep}",code="{code}"}}', v) for (ep, code), v in sorted(http_counts.items())])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the aiohttp application

@dataclass
class _State:
    batcher: object
    model_name: str
    limits: Limits
    ready: bool = True
    http_counts: dict = field(default_factory=dict)


def build_app(batcher, *, model_name: str = "iws", limits: Limits | None = None):
    """The aiohttp application serving `batcher` (a BatchingClassifier) as model `model_name`."""
    from aiohttp import web

    limits = dataclasses.replace(limits or Limits())
    if limits.max_pixels is None:
        limits.max_pixels = batcher.classifier.loader.max_pixels
    state = _State(batcher, model_name, limits)
    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=[_error_middleware(state)])
    app["iws"] = state

    def json_response(obj, status: int = 200):
        return web.json_response(obj, status=status)

    def model_or_404(request):
        name = request.match_info["name"]
        version = request.match_info.get("version")
        if name != state.model_name or version not in (None, "", MODEL_VERSION):
            raise RequestError(404, f"unknown model {name!r}" + (f" version {version!r}" if version else "")
                               + f"; this server serves {state.model_name!r} version {MODEL_VERSION}")

    async def live(request):
        return json_response({"live": True})

    async def ready(request):
        return json_response({"ready": state.ready}, 200 if state.ready else 503)

    async def server_metadata(request):
        return json_response({"name": "iws-engine", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_metadata(request):
        model_or_404(request)
        clf = batcher.classifier
        return json_response({
            "name": state.model_name, "versions": [MODEL_VERSION], "platform": "iws-engine",
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": n, "datatype": t, "shape": [-1]} for n, t in OUTPUTS.items()],
            "parameters": {"model_id": batcher.model_id, "threshold": batcher.threshold,
                           "runtime": getattr(clf, "runtime", ""), "max_batch_size": batcher.max_batch_size},
        })

    async def model_ready(request):
        model_or_404(request)
        return json_response({"name": state.model_name, "ready": state.ready}, 200 if state.ready else 503)

    async def model_config(request):
        model_or_404(request)
        return json_response({
            "name": state.model_name, "platform": "iws-engine", "max_batch_size": 0,
            "input": [{"name": INPUT_NAME, "data_type": "TYPE_STRING", "dims": [-1]}],
            "output": [{"name": n, "data_type": {"FP32": "TYPE_FP32", "INT8": "TYPE_INT8",
                                                 "BYTES": "TYPE_STRING"}[t], "dims": [-1]}
                       for n, t in OUTPUTS.items()],
            "dynamic_batching": {"max_batch_size": batcher.max_batch_size,
                                 "max_queue_delay_microseconds": int(batcher.max_queue_delay * 1e6)},
        })

    async def infer(request):
        from iws_engine.batching import BatcherClosed, QueueFull

        model_or_404(request)
        if not state.ready:
            raise RequestError(503, "the server is shutting down")
        body = await request.read()  # aiohttp answers 413 beyond client_max_size
        parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH), limits)
        check_pixel_limit(parsed.images, limits.max_pixels)
        futures = []
        try:
            for i, png in enumerate(parsed.images):
                futures.append(batcher.submit(png, block=False, deadline=parsed.timeout_s, name=f"{INPUT_NAME}[{i}]"))
        except (QueueFull, BatcherClosed) as e:
            for f in futures:
                f.cancel()  # withdraw what has not started; the rest finishes and is dropped
            raise RequestError(503, f"cannot accept the request now: {e}") from None
        rows = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        payload, headers = encode_infer_response(state.model_name, parsed, rows)
        return web.Response(body=payload, headers=headers)

    async def metrics(request):
        text = prometheus_text(batcher.stats(), state.http_counts, state.ready)
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    async def on_shutdown(app):
        state.ready = False  # health/ready says so while accepted requests finish

    model = r"/v2/models/{name}"
    versioned = r"/v2/models/{name}/versions/{version}"
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/metrics", metrics)
    for prefix in (model, versioned):
        app.router.add_get(prefix, model_metadata)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_get(prefix + "/config", model_config)
        app.router.add_post(prefix + "/infer", infer)
    app.on_shutdown.append(on_shutdown)
    return app


def _error_middleware(state: _State):
    """JSON {"error": ...} for every refusal (what tritonclient reads), and per-endpoint status counters."""
    from aiohttp import web

    @web.middleware
    async def middleware(request, handler):
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unrouted"
        try:
            response = await handler(request)
        except RequestError as e:
            response = web.json_response({"error": e.message}, status=e.status)
        except web.HTTPException as e:  # aiohttp's own: 404 route, 405, 413 body too large
            message = e.text or e.reason
            if e.status == 413:
                message = (f"request body too large: {message} "
                           f"(limit {state.limits.max_body_bytes} bytes, --max-body-mb)")
            response = web.json_response({"error": message}, status=e.status)
        key = (endpoint, response.status)
        state.http_counts[key] = state.http_counts.get(key, 0) + 1
        return response

    return middleware


# ----------------------------------------------------------------------------- running it

async def serve_until(app, host: str, port: int, stop: asyncio.Event, *, on_started=None,
                      shutdown_timeout: float = 60.0) -> None:
    """Serve `app` until `stop` is set, then stop accepting, finish accepted requests and clean up."""
    from aiohttp import web

    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        if on_started is not None:
            on_started(runner.addresses[0][:2])
        await stop.wait()
    finally:
        await runner.cleanup()  # stops listening, waits for in-flight handlers, runs on_shutdown/on_cleanup


class ServerThread:
    """The server in a background thread with its own event loop (tests, benchmarks, embedding).

    with ServerThread(batcher, port=0) as server:     # an ephemeral loopback port
        client = tritonclient.http.InferenceServerClient(server.address)
    """

    def __init__(self, batcher, *, host: str = "127.0.0.1", port: int = 0, model_name: str = "iws",
                 limits: Limits | None = None):
        self.app = build_app(batcher, model_name=model_name, limits=limits)
        self.host, self.port = host, port
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="iws-serve", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def _run(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def started(address):
                self.host, self.port = address[0], address[1]
                self._started.set()

            await serve_until(self.app, self.host, self.port, self._stop, on_started=started)

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._started.set()

    def start(self) -> "ServerThread":
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise RuntimeError(f"the server did not start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        """Graceful: stop accepting, finish the requests in flight, return when the server has stopped."""
        if self._thread.ident is None:  # never started
            return
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """serve's own options (the model and loading options are classify's, added by the cli)."""
    g = p.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, loopback only; 0.0.0.0 exposes it to the network)")
    g.add_argument("--port", type=int, default=8000, help="(default: %(default)s; 0 picks a free port)")
    g.add_argument("--model-name", default="iws", help="the model's name in /v2/models/{name} (default: %(default)s)")
    g.add_argument("--max-queue-delay-ms", type=float, default=5.0, metavar="MS",
                   help="how long a batch may wait to fill (default: %(default)s)")
    g.add_argument("--max-queue", type=positive_int, default=1024, metavar="N",
                   help="images waiting to start before requests get 503 (default: %(default)s)")
    g.add_argument("--max-images", type=positive_int, default=DEFAULT_MAX_IMAGES, metavar="N",
                   help="images per request (default: %(default)s)")
    g.add_argument("--max-body-mb", type=positive_int, default=DEFAULT_MAX_BODY_MB, metavar="MB",
                   help="request body size limit (default: %(default)s)")


def run(args) -> int:
    """The `iws-engine serve` command: load the model, serve until SIGTERM/SIGINT, drain, exit 0."""
    import signal

    from iws_engine.batching import BatchingClassifier
    from iws_engine.cli import EXIT_OK, EXIT_USAGE, make_classifier

    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("iws-engine serve: needs aiohttp: pip install 'iws-engine[serve]'", file=sys.stderr)
        return EXIT_USAGE
    try:  # --loader as classify takes it; gpu/dali decode each formed batch on the device (BatchingClassifier)
        clf = make_classifier(args)
    except (ValueError, RuntimeError) as e:  # a loader that cannot run here says why (LoaderError)
        print(f"iws-engine serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    limits = Limits(max_body_bytes=args.max_body_mb * 1024 * 1024, max_images=args.max_images,
                    max_pixels=args.max_pixels)
    with clf, BatchingClassifier(classifier=clf, max_batch_size=args.batch_size,
                                 max_queue_delay_ms=args.max_queue_delay_ms, max_queue=args.max_queue) as batcher:
        app = build_app(batcher, model_name=args.model_name, limits=limits)

        async def main():
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)

            def started(address):
                print(f"iws-engine serve: listening on http://{address[0]}:{address[1]} (model {args.model_name!r}: "
                      f"{clf.model_id}, {clf.runtime}, {clf.loader.name} loader decoding {batcher.decode.replace('_', ' ')}, "
                      f"max batch {batcher.max_batch_size})", file=sys.stderr,
                      flush=True)

            await serve_until(app, args.host, args.port, stop, on_started=started)

        try:
            asyncio.run(main())
        except OSError as e:  # the address is taken, or not ours to bind
            print(f"iws-engine serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
            return EXIT_USAGE
        stats = batcher.stats()
    print(f"iws-engine serve: stopped after {stats['completed']} images in {stats['batches']} batches "
          f"({stats['errors']} errors)", file=sys.stderr, flush=True)
    return EXIT_OK
