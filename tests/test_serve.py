"""`iws-engine serve`: the real server on an ephemeral loopback port, spoken to by the real tritonclient.http
client and by the standard library's HTTP client; SIGTERM on a real `iws-engine serve` process."""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("aiohttp", reason="the serve extra (aiohttp) is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (test extra) is not installed")

from iws_engine.serve import Limits, ServerThread  # noqa: E402

N_DISTINCT = 16
MAX_BODY = 2 * 1024 * 1024
MAX_IMAGES = 32


def _png(i: int, size=(96, 80)) -> bytes:
    from iws_engine.export.synth import encode_png, render_vignette

    return encode_png(render_vignette(np.random.default_rng([13, i]), i % 2 == 0, size[1], size[0]), "rgba16")


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return [_png(i) for i in range(N_DISTINCT)]


@pytest.fixture(scope="module")
def offline(pngs) -> np.ndarray:
    from iws_engine import Classifier

    with Classifier() as clf:
        return np.array([r.score for r in clf.classify(pngs)])


@pytest.fixture(scope="module")
def server():
    from iws_engine import BatchingClassifier

    with BatchingClassifier(max_queue_delay_ms=5) as batcher:
        with ServerThread(batcher, limits=Limits(max_body_bytes=MAX_BODY, max_images=MAX_IMAGES)) as srv:
            yield srv


def png_input(blobs: list[bytes]):
    x = httpclient.InferInput("png", [len(blobs)], "BYTES")
    x.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    return x


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def get(server, path: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_health_metadata_and_config_with_tritonclient(server):
    client = httpclient.InferenceServerClient(server.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iws") and not client.is_model_ready("other")
    meta = client.get_model_metadata("iws")
    assert meta["name"] == "iws" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "png", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("score", "FP32"), ("decision", "INT8"),
                                                                     ("error", "BYTES")]
    assert meta["parameters"]["model_id"].startswith("sarcnn_synthetic")
    config = client.get_model_config("iws")
    assert config["dynamic_batching"]["max_batch_size"] == 16
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    with pytest.raises(httpclient.InferenceServerException, match="unknown model 'other'"):
        client.get_model_metadata("other")
    assert client.get_model_metadata("iws", model_version="1")["name"] == "iws"


def test_infer_binary_mixing_good_and_malformed_pngs(server, pngs, offline):
    client = httpclient.InferenceServerClient(server.address)
    blobs = [pngs[0], b"this is not a PNG", pngs[1], pngs[2][:500], pngs[3]]
    result = client.infer("iws", [png_input(blobs)], request_id="req-7")
    score, decision, error = (result.as_numpy(n) for n in ("score", "decision", "error"))
    assert score.dtype == np.float32 and decision.dtype == np.int8 and score.shape == (5,)
    good = [0, 2, 4]
    np.testing.assert_allclose(score[good], offline[[0, 1, 3]], atol=1e-6, rtol=0)
    assert list(decision[good]) == [int(s >= 0.41) for s in offline[[0, 1, 3]]]
    assert math.isnan(score[1]) and math.isnan(score[3]) and decision[1] == decision[3] == -1
    assert error[0] == error[2] == error[4] == b""
    assert error[1].decode().startswith("png[1]: not a PNG file")
    assert error[3].decode().startswith("png[3]: ")
    assert result.get_response()["id"] == "req-7"
    # outputs chosen by the client, one as JSON and one binary, as Triton honours them
    result = client.infer("iws", [png_input(blobs)], outputs=[
        httpclient.InferRequestedOutput("error", binary_data=False),
        httpclient.InferRequestedOutput("score", binary_data=True)])
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["error", "score"]
    assert response["outputs"][0]["data"][1].startswith("png[1]: not a PNG file")
    assert "binary_data_size" in response["outputs"][1]["parameters"]
    np.testing.assert_allclose(result.as_numpy("score")[good], offline[[0, 1, 3]], atol=1e-6, rtol=0)
    assert result.as_numpy("decision") is None


def test_infer_json_with_base64_pngs(server, pngs, offline):
    request = {"id": "j1", "inputs": [{"name": "png", "datatype": "BYTES", "shape": [3],
                                       "data": [base64.b64encode(b).decode() for b in (pngs[4], b"x", pngs[5])]}]}
    status, headers, body = post(server, "/v2/models/iws/infer", json.dumps(request).encode(),
                                 {"Content-Type": "application/json"})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    response = json.loads(body)
    out = {o["name"]: o for o in response["outputs"]}
    assert response["id"] == "j1" and response["model_name"] == "iws"
    assert out["score"]["datatype"] == "FP32" and out["score"]["shape"] == [3]
    assert out["score"]["data"][0] == pytest.approx(offline[4], abs=1e-6)
    assert out["score"]["data"][2] == pytest.approx(offline[5], abs=1e-6)
    assert math.isnan(out["score"]["data"][1]) and out["decision"]["data"][1] == -1
    assert out["error"]["data"][1].startswith("png[1]: ")


def _binary_request(elements: list[bytes], count: int | None = None, header_length: str | None = None):
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = json.dumps({"inputs": [{"name": "png", "datatype": "BYTES", "shape": [count or len(elements)],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": header_length or str(len(header)),
                          "Content-Type": "application/octet-stream"}


def test_limits_and_malformed_requests_get_clear_4xx(server, pngs):
    def refused(status: int, path: str, body: bytes, headers=None, match: str = "") -> str:
        code, _, payload = post(server, path, body, headers)
        assert code == status, payload
        message = json.loads(payload)["error"]
        assert re.search(match, message), message
        return message

    infer = "/v2/models/iws/infer"
    refused(413, infer, b"x" * (MAX_BODY + 1), match=f"too large.*limit {MAX_BODY} bytes")
    body, headers = _binary_request([pngs[0]] * (MAX_IMAGES + 1))
    refused(413, infer, body, headers, match=f"{MAX_IMAGES + 1} images in one request; the limit is {MAX_IMAGES}")
    bomb = bytearray(pngs[0])
    bomb[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR declares 10^10 pixels
    body, headers = _binary_request([pngs[1], bytes(bomb)])
    refused(413, infer, body, headers, match=r"png\[1\]: 100000x100000 = 10000000000 pixels, above the limit")
    refused(400, infer, b"{not json", match="malformed JSON")
    body, headers = _binary_request([pngs[0]], header_length="abc")
    refused(400, infer, body, headers, match="Inference-Header-Content-Length is not an integer")
    body, headers = _binary_request([pngs[0]], header_length="99999999")
    refused(400, infer, body, headers, match="outside the body")
    body, headers = _binary_request([pngs[0], pngs[1]], count=3)
    refused(400, infer, body, headers, match="shape says 3 elements, binary data holds 2")
    body, headers = _binary_request([pngs[0]])
    refused(400, infer, body[:-10], headers, match="binary_data_size 5.* does not fit the 5.* binary bytes left")
    raw = struct.pack("<I", 1000) + b"short"  # an element claiming more bytes than the tensor holds
    header = json.dumps({"inputs": [{"name": "png", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    refused(400, infer, header + raw, {"Inference-Header-Content-Length": str(len(header))},
            match="BYTES element 0 declares 1000 bytes, 5 remain")
    wrong_type = {"inputs": [{"name": "png", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    refused(400, infer, json.dumps(wrong_type).encode(), match="must be BYTES")
    wrong_name = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]}
    refused(400, infer, json.dumps(wrong_name).encode(), match="unknown input 'image'")
    not_b64 = {"inputs": [{"name": "png", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}
    refused(400, infer, json.dumps(not_b64).encode(), match="not a base64 string")
    bad_output = {"inputs": [{"name": "png", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}],
                  "outputs": [{"name": "logit"}]}
    refused(400, infer, json.dumps(bad_output).encode(), match="unknown output 'logit'")
    refused(404, "/v2/models/other/infer", json.dumps(wrong_type).encode(), match="unknown model 'other'")
    refused(404, "/v2/models/iws/versions/2/infer", json.dumps(wrong_type).encode(), match="version '2'")
    code, _, _ = get(server, "/v2/nothing-here")
    assert code == 404
    # the server is unharmed
    status, _, _ = get(server, "/v2/health/ready")
    assert status == 200


def test_metrics_in_prometheus_format(server, pngs):
    client = httpclient.InferenceServerClient(server.address)
    client.infer("iws", [png_input([pngs[0], b"bad"])])
    status, headers, body = get(server, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples["iws_ready"] == 1
    assert samples["iws_images_total"] >= 2 and samples["iws_image_errors_total"] >= 1
    assert samples["iws_images_completed_total"] == samples["iws_images_total"]
    buckets = [v for k, v in samples.items() if k.startswith("iws_batch_size_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == samples["iws_batch_size_count"] == samples["iws_batches_total"]
    assert samples['iws_http_requests_total{endpoint="/v2/models/{name}/infer",code="200"}'] >= 1
    assert 0 < samples['iws_image_latency_seconds{quantile="0.5"}'] <= samples['iws_image_latency_seconds{quantile="0.99"}']


def test_load_16_concurrent_clients(server, pngs, offline):
    """Every request answered exactly once, errors only for the malformed inputs, scores equal offline."""
    before = server.app["iws"].batcher.stats()
    answers: dict[tuple[int, int], tuple] = {}
    failures = []

    def client_thread(k: int):
        rng = np.random.default_rng(k)
        client = httpclient.InferenceServerClient(server.address, network_timeout=60)
        try:
            for j in range(6):
                idx = [int(i) for i in rng.integers(0, N_DISTINCT, size=int(rng.integers(1, 4)))]
                blobs = [pngs[i] for i in idx]
                bad = -1
                if (k + j) % 5 == 0:
                    bad = int(rng.integers(0, len(blobs)))
                    blobs[bad] = b"malformed" + bytes(k)
                result = client.infer("iws", [png_input(blobs)], request_id=f"{k}-{j}")
                assert (k, j) not in answers
                answers[(k, j)] = (idx, bad, result.get_response()["id"], result.as_numpy("score"),
                                   result.as_numpy("error"))
        except Exception as e:  # reported below, with the thread that failed
            failures.append((k, repr(e)))

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(16)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures
    assert len(answers) == 16 * 6
    images = errors = 0
    for (k, j), (idx, bad, request_id, score, error) in answers.items():
        assert request_id == f"{k}-{j}" and score.shape == (len(idx),)
        for n, i in enumerate(idx):
            images += 1
            if n == bad:
                errors += 1
                assert math.isnan(score[n]) and error[n].decode().startswith(f"png[{n}]: not a PNG file")
            else:
                assert error[n] == b"" and abs(score[n] - offline[i]) <= 1e-6
    after = server.app["iws"].batcher.stats()
    assert after["completed"] - before["completed"] == images
    assert after["errors"] - before["errors"] == errors > 0
    assert after["batches"] - before["batches"] < images  # requests of different clients were batched together
    assert time.monotonic() - t0 < 120


def test_sigterm_finishes_accepted_requests(tmp_path):
    """A real `iws-engine serve` process: SIGTERM while requests are being served -> all answered, exit 0."""
    blobs = [_png(i, size=(128, 128)) for i in range(8)]
    proc = subprocess.Popen([sys.executable, "-m", "iws_engine", "serve", "--port", "0", "--batch-size", "4",
                             "--max-queue-delay-ms", "1"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        address = None
        for line in proc.stderr:
            found = re.search(r"listening on http://([\d.]+:\d+)", line)
            if found:
                address = found.group(1)
                break
        assert address, "the server did not start"
        host, port = address.split(":")
        assert host == "127.0.0.1"  # loopback by default
        n_requests, per_request = 4, 32
        results, failures = {}, []

        def client_thread(k: int):
            try:
                client = httpclient.InferenceServerClient(address, network_timeout=120)
                results[k] = client.infer("iws", [png_input([blobs[(k + i) % 8] for i in range(per_request)])])
            except Exception as e:
                failures.append(repr(e))

        threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(n_requests)]
        for t in threads:
            t.start()
        total = n_requests * per_request
        deadline = time.monotonic() + 60
        seen = {}
        while time.monotonic() < deadline:  # wait until every image is accepted, then stop the server
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            seen = dict(re.findall(r"^(iws_images_total|iws_images_completed_total) (\d+)$", text, re.M))
            if int(seen.get("iws_images_total", 0)) == total:
                break
            time.sleep(0.01)
        assert int(seen["iws_images_completed_total"]) < total, "the requests finished before SIGTERM was sent"
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=60) == 0
        assert not failures
        assert len(results) == n_requests
        for k, result in results.items():
            scores = result.as_numpy("score")
            assert scores.shape == (per_request,) and not np.isnan(scores).any()
            assert set(result.as_numpy("error")) == {b""}
        tail = proc.stderr.read()
        assert f"stopped after {total} images" in tail
        with pytest.raises(OSError):  # nobody listens any more
            socket_conn = http.client.HTTPConnection(host, int(port), timeout=5)
            socket_conn.request("GET", "/v2/health/live")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_stack_is_imported_only_when_serving():
    code = ("import sys, iws_engine, iws_engine.cli, iws_engine.serve, iws_engine.batching; "
            "iws_engine.cli.build_parser(); "
            "print(sorted(m for m in ('aiohttp', 'tritonclient', 'torch', 'onnxruntime') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_cli_serve_usage_errors(server):
    from tests.conftest import run_cli

    r = run_cli("serve", "--port", str(server.port))  # taken by the test server
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{server.port}" in r.stderr


def _device_loader_missing(loader: str) -> str | None:
    """Why `loader` (gpu, dali) cannot be built here, in the loader's own words (None: it can)."""
    from iws_engine.loaders import create_loader
    from iws_engine.loaders.gpu import LoaderError
    from iws_engine.preprocess import PreprocessSpec

    try:
        create_loader(loader, PreprocessSpec(mean=0.5, std=0.25), batch_size=4)
    except LoaderError as e:
        return str(e)
    return None


@pytest.mark.parametrize("loader", ["gpu", "dali"])
def test_cli_serve_takes_the_device_loaders(loader):
    # serve accepts --loader as classify does; where the loader cannot run, it exits 2 with the loader's reason
    from tests.conftest import run_cli

    reason = _device_loader_missing(loader)
    if reason is None:
        pytest.skip(f"the {loader} loader runs here: serving with it is test_batching's GPU test's path")
    r = run_cli("serve", "--loader", loader, "--port", "0")
    assert r.returncode == 2, r.stderr
    assert f"iws-engine serve: {reason}" in r.stderr
    assert "listening on" not in r.stderr
