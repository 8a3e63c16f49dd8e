"""bench/runner.py, bench/report.py, bench/gpu_telemetry.py and the bench/report commands (CPU only, tiny runs),
for pipeline B (SAR_CNN) and pipeline A (the tiny EVA02 + the paper's XGBoost model)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from iws_engine.bench import bench_cmd, report_cmd
from iws_engine.bench.gpu_telemetry import ENERGY_SCOPE, GpuMonitor, decode_throttle_reasons, summarise_windows
from iws_engine.bench.projection import project_from_bench
from iws_engine.bench.report import SCHEMA, markdown_table, output_stem, render_report, write_outputs
from iws_engine.bench.runner import BenchConfig, default_configs, run_bench
from tests.conftest import XGBOOST_MODEL, require, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONFIGS = [BenchConfig("torch", "fp32", "cpu"), BenchConfig("onnxruntime", "fp32", "cpu")]
TINY = dict(batch_sizes=(1, 4), runs=2, warmup=1, n_images=8, size=(64, 64))


@pytest.fixture(scope="module")
def model_result(random_weights) -> dict[str, Any]:
    return run_bench(CONFIGS, mode="model", weights=random_weights, **TINY)


@pytest.fixture(scope="module")
def e2e_result(random_weights) -> dict[str, Any]:
    return run_bench(CONFIGS, mode="e2e", weights=random_weights, **TINY)


@pytest.fixture(scope="module")
def written(model_result, e2e_result, tmp_path_factory) -> tuple[Path, dict[str, dict[str, Path]]]:
    out = tmp_path_factory.mktemp("results")
    return out, {"model": write_outputs(model_result, out), "e2e": write_outputs(e2e_result, out)}


# ----------------------------------------------------------------------------- configurations

def test_config_syntax() -> None:
    assert BenchConfig.parse("torch:fp32") == BenchConfig("torch", "fp32", "cpu")
    assert BenchConfig.parse("torch:fp16:cuda:1") == BenchConfig("torch", "fp16", "cuda:1")
    assert BenchConfig.parse("torch:fp16:cuda:1").cuda_index == 1
    assert BenchConfig.parse("onnxruntime:fp32:cpu").label == "onnxruntime:fp32:cpu"
    gpu_loader = BenchConfig.parse("torch:fp16:cuda@gpu")
    assert gpu_loader == BenchConfig("torch", "fp16", "cuda", "gpu") and gpu_loader.label == "torch:fp16:cuda@gpu"
    with pytest.raises(ValueError, match="loader must be"):
        BenchConfig.parse("torch:fp32@nvjpeg")
    for bad in ("torch", "torch:", ":fp32", ""):
        with pytest.raises(ValueError):
            BenchConfig.parse(bad)
    assert default_configs(False) == CONFIGS
    assert default_configs(True)[0] == BenchConfig("torch", "fp32", "cuda")
    assert BenchConfig("torch", "fp16", "cuda") in default_configs(True)
    assert default_configs(False, "eva02xgb") == CONFIGS
    assert [c.label for c in default_configs(True, "eva02xgb")] == [
        "torch:fp32:cuda", "torch:bf16:cuda", "inductor:bf16:cuda", "inductor:fp16:cuda", "tensorrt:fp16:cuda"]


# ----------------------------------------------------------------------------- measurements

def _check_consistent(result: dict[str, Any], mode: str) -> None:
    n, runs = TINY["n_images"], TINY["runs"]
    assert result["schema"] == SCHEMA and result["mode"] == mode
    assert result["protocol"]["n_images"] == n and result["protocol"]["runs"] == runs
    assert result["baseline"] == "torch:fp32:cpu"
    rows = result["rows"]
    assert [(r["config"], r["batch_size"]) for r in rows] == [(c.label, b) for b in (1, 4) for c in CONFIGS]
    baseline = {r["batch_size"]: r for r in rows if r["config"] == result["baseline"]}
    for row in rows:
        walls, rates = row["wall_s"]["per_run"], row["throughput_img_s"]["per_run"]
        assert len(walls) == len(rates) == runs and all(w > 0 for w in walls)
        assert rates == pytest.approx([n / w for w in walls], rel=1e-12)
        assert row["throughput_img_s"]["mean"] == pytest.approx(statistics.fmean(rates))
        assert row["throughput_img_s"]["std"] >= 0 and row["wall_s"]["std"] >= 0
        latency = row["latency_ms"]
        assert latency["batches"] == runs * math.ceil(n / row["batch_size"])
        assert 0 < latency["p50"] <= latency["p95"]
        batches_ms = latency["mean"] * latency["batches"]
        if mode == "model":  # batches tile the pass exactly
            assert batches_ms == pytest.approx(1000 * sum(walls), rel=1e-6)
        else:  # up to the last batch's completion; the pass then hands out that batch's rows
            assert 0.5 * 1000 * sum(walls) < batches_ms <= 1000 * sum(walls)
        assert row["peak_rss_mb"] > 0
        base_rates = baseline[row["batch_size"]]["throughput_img_s"]["per_run"]
        assert row["speedup_vs_baseline"]["per_run"] == pytest.approx([r / b for r, b in zip(rates, base_rates)])
        if row["config"] == result["baseline"]:
            assert row["speedup_vs_baseline"]["per_run"] == [1.0] * runs
            assert row["speedup_vs_baseline"]["mean"] == 1.0 and row["speedup_vs_baseline"]["std"] == 0.0
    best = max(rows, key=lambda r: r["throughput_img_s"]["mean"])
    assert result["throughput_img_s"] == best["throughput_img_s"]["mean"]
    assert result["best"] == {"config": best["config"], "batch_size": best["batch_size"],
                              "throughput_img_s": best["throughput_img_s"]["mean"]}
    assert all("error" not in c and c["load_s"] > 0 and c["info"]["backend"] == c["backend"] for c in result["configs"])
    assert {"torch", "onnxruntime", "numpy"} <= set(result["libraries"])
    assert result["machine"]["cpu"] and result["machine"]["cores"] >= 1


def test_model_mode(model_result) -> None:
    _check_consistent(model_result, "model")
    assert all("stages" not in row for row in model_result["rows"])


def test_e2e_mode_reports_stages(e2e_result) -> None:
    _check_consistent(e2e_result, "e2e")
    for row in e2e_result["rows"]:
        stages = row["stages"]
        assert stages["decode_workers"] >= 1
        for name in ("read", "decode", "preprocess", "inference"):
            seconds = stages[name]["seconds"]
            assert len(seconds["per_run"]) == TINY["runs"] and min(seconds["per_run"]) >= 0
            assert stages[name]["ms_per_img"] == pytest.approx(1000 * seconds["mean"] / TINY["n_images"])
        assert stages["inference"]["clock"] == "wall" and stages["decode"]["clock"] == "cpu"
        assert stages["decode"]["seconds"]["mean"] > 0 and stages["inference"]["seconds"]["mean"] > 0
        # Inference is part of each pass's wall time.
        assert all(i <= w for i, w in zip(stages["inference"]["seconds"]["per_run"], row["wall_s"]["per_run"]))


def test_gpu_columns_absent_without_nvml(model_result, e2e_result) -> None:
    for result in (model_result, e2e_result):
        assert "gpu" not in result["machine"]
        assert all("gpu" not in row for row in result["rows"])
        telemetry = result["gpu_telemetry"]
        assert telemetry["available"] is False and telemetry["reason"]
        assert set(telemetry) == {"available", "reason"}


def test_gpu_monitor_unavailable_says_why() -> None:
    with GpuMonitor(idle_seconds=0) as gpu:
        if gpu.available:
            pytest.skip("this machine has a working NVML")
        assert gpu.reason and ("NVML" in gpu.reason or "pynvml" in gpu.reason)
        assert gpu.idle_power_w is None and gpu.device == {}
        assert gpu.status() == {"available": False, "reason": gpu.reason}
        with pytest.raises(RuntimeError, match="unavailable"):
            with gpu.window():
                pass


def test_failing_config_is_recorded_not_fatal(random_weights) -> None:
    result = run_bench([BenchConfig("onnxruntime"), BenchConfig("onnxruntime", "fp16")], mode="model",
                       batch_sizes=(2,), runs=1, warmup=0, n_images=2, size=(32, 32), weights=random_weights)
    assert [r["config"] for r in result["rows"]] == ["onnxruntime:fp32:cpu"]
    assert "fp16" in result["configs"][1]["error"]
    with pytest.raises(ValueError):
        run_bench(CONFIGS, mode="fast", weights=random_weights)


# ----------------------------------------------------------------------------- telemetry logic (fake NVML)

def _fake_pynvml(idle_w: float, busy_w: float) -> types.ModuleType:
    """Just enough of pynvml for GpuMonitor: power idle_w, energy counter growing at busy_w."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    nvml.NVMLError = NVMLError
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    nvml.nvmlDeviceGetName = lambda handle: b"Fake H100"
    nvml.nvmlDeviceGetCudaComputeCapability = lambda handle: (9, 0)
    nvml.nvmlSystemGetDriverVersion = lambda: "580.00"
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(total=80 << 30, used=3 << 30)

    def no_power_limit(handle):
        raise NVMLError("Not Supported")

    nvml.nvmlDeviceGetEnforcedPowerLimit = no_power_limit
    nvml.nvmlDeviceGetPowerUsage = lambda handle: int(idle_w * 1000)  # mW
    nvml.nvmlDeviceGetTemperature = lambda handle, sensor: 41
    nvml.nvmlDeviceGetTotalEnergyConsumption = lambda handle: int(time.perf_counter() * busy_w * 1000)  # mJ
    nvml.nvmlDeviceGetCurrentClocksEventReasons = lambda handle: 0x1 | 0x4
    return nvml


def test_gpu_monitor_with_fake_nvml(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(idle_w=100.0, busy_w=150.0))
    with GpuMonitor(0, interval_s=0.02, idle_seconds=0.1) as gpu:
        assert gpu.available and gpu.reason is None
        assert gpu.device == {"name": "Fake H100", "nvml_index": 0, "compute_capability": "9.0",
                              "driver": "580.00", "memory_total_mb": 80 * 1024}
        assert gpu.idle_power_w == 100.0
        with gpu.window() as window:
            time.sleep(0.3)
        record = summarise_windows(gpu, [window, window], images_per_window=10, allocator_peak_bytes=2 << 20)
    gross, net = record["energy_mj_per_img_gross"], record["energy_mj_per_img_net"]
    # Tolerances cover a few ms between the counter reads and the window's clock on a loaded machine.
    expected_gross = 150.0 * window.seconds * 1000 / 10  # W x s x 1000 = mJ, over 10 images
    assert gross["mean"] == pytest.approx(expected_gross, rel=0.05) and gross["std"] == 0.0
    assert net["mean"] == pytest.approx(expected_gross * 50 / 150, abs=0.05 * expected_gross)
    assert record["scope"] == ENERGY_SCOPE == "GPU board only (NVML)" and record["window_s"] == window.seconds
    assert record["power_w"]["samples"] >= 2 * 3 and record["power_w"]["max"] == 100.0
    assert record["max_temperature_c"] == 41
    assert record["throttle_reasons"] == ["gpu_idle", "sw_power_cap"] and record["throttled"] is True
    assert record["nvml_memory_used_peak_mb"] == 3 * 1024 and record["allocator_peak_mb"] == 2.0


def test_gpu_machine_without_cuda_configs(random_weights, monkeypatch) -> None:
    """NVML present but only CPU configurations: the GPU is named, no row gets GPU columns."""
    from iws_engine.bench.report import output_stem

    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(idle_w=100.0, busy_w=150.0))
    result = run_bench([BenchConfig("onnxruntime")], mode="model", batch_sizes=(2,), runs=1, warmup=0, n_images=2,
                       size=(32, 32), weights=random_weights)
    assert result["machine"]["gpu"]["name"] == "Fake H100" and result["gpu_telemetry"]["available"] is True
    assert all("gpu" not in row for row in result["rows"])
    assert "fake-h100" not in output_stem(result)


def test_gpu_columns_in_the_table(model_result) -> None:
    from iws_engine.bench.report import output_stem

    result = json.loads(json.dumps(model_result))
    result["machine"]["gpu"] = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": "580.00"}
    row = result["rows"][0]
    row["device"] = "cuda"
    row["gpu"] = {"scope": ENERGY_SCOPE, "window_s": 1.5, "energy_mj_per_img_gross": {"mean": 12.5, "std": 0.5},
                  "energy_mj_per_img_net": {"mean": 6.25, "std": 0.25}, "power_w": {"mean": 300.0, "max": 350.0, "samples": 15},
                  "max_temperature_c": 55, "throttle_reasons": [], "throttled": False,
                  "nvml_memory_used_peak_mb": 2048.0, "allocator_peak_mb": 512.0}
    table = markdown_table(result).splitlines()
    assert "mJ/img gross (GPU board)" in table[0] and "VRAM MB allocator / NVML" in table[0]
    assert "| 12.50 ± 0.50 | 6.25 ± 0.25 | 300 / 350 | 55 | none | 512 / 2,048 |" in table[2]
    assert table[3].endswith("| – | – | – | – | – | – / – |")  # a CPU row on the same machine
    assert output_stem(result).startswith("bench-nvidia-h100-80gb-hbm3-model-")


def test_throttle_reason_names() -> None:
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(0x44) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert decode_throttle_reasons(0x1001) == ["gpu_idle", "unknown_0x1000"]


# ----------------------------------------------------------------------------- outputs

def test_outputs_are_written(written, model_result, e2e_result) -> None:
    _out, paths = written
    for mode, result in (("model", model_result), ("e2e", e2e_result)):
        files = paths[mode]
        assert files["json"].name.startswith("bench-") and f"-{mode}-{result['date']}-{result['commit']}" in files["json"].name
        assert files["markdown"].with_suffix(".json") == files["json"]
        assert json.loads(files["json"].read_text())["schema"] == "iws-engine/bench/1"
        table = [line for line in files["markdown"].read_text().splitlines() if line.startswith("| ")]
        assert len(table) == 1 + len(CONFIGS) * 2  # header + config x batch size
        for config in CONFIGS:
            assert sum(line.startswith(f"| {config.label} |") for line in table) == 2
        assert "mJ/img" not in table[0]  # no GPU columns without NVML
        assert all(p.read_bytes().startswith(PNG_SIGNATURE) for k, p in files.items() if k.endswith("_plot"))
        assert ("stages_plot" in files) == (mode == "e2e")
    assert "decode ms/img" in markdown_table(e2e_result) and "decode ms/img" not in markdown_table(model_result)


def test_second_write_does_not_overwrite(model_result, tmp_path) -> None:
    first, second = write_outputs(model_result, tmp_path), write_outputs(model_result, tmp_path)
    assert first["json"] != second["json"] and first["json"].exists() and second["json"].stem.endswith("-2")


def test_projection_reads_bench_json(written, model_result) -> None:
    projection = project_from_bench(written[1]["model"]["json"])
    assert projection["throughput_img_s"] == model_result["throughput_img_s"]
    assert model_result["best"]["config"] in projection["source"]


def _cpu_e2e_result() -> dict[str, Any]:
    """A bench/cpu_e2e.py result as that script writes it."""
    summary = {"img_per_s_mean": 40.0, "img_per_s_std": 1.0, "seconds": [0.2], "images": 8}
    return {"schema": "iws-engine/bench-cpu-e2e/1",
            "machine": {"cpu": "Test CPU 9000", "cores": 2, "python": "3", "platform": "linux"},
            "commit": "abc1234", "date": "2026-01-01",
            "config": {"n": 8, "format": "rgba16", "size": "64x64", "mean_png_bytes": 1e4, "runs": 1,
                       "batch_size": 4, "backend": "onnxruntime", "model": "m"},
            "stages": {"decode": summary, "preprocess": summary, "inference": summary},
            "end_to_end": summary, "throughput_img_s": 40.0}


def test_report_page(written, model_result, tmp_path) -> None:
    out, paths = written
    (out / "cpu-e2e-test-cpu-9000-2c-onnxruntime-rgba16-2026-01-01-abc1234.json").write_text(json.dumps(_cpu_e2e_result()))
    page_path = render_report(out, tmp_path / "site" / "REPORT.md", paper_data_dir=tmp_path / "no-paper-data")
    page = page_path.read_text()
    assert "Against the paper (pipeline B, SAR_CNN)" in page
    assert "3,396" in page and "NVIDIA L40" in page and "15.2" in page and "56 Xeon cores" in page
    assert "paper Tables 3–4" in page
    assert "IWS projection of the best measured throughput" in page and "Archive pass" in page
    machine = f"{model_result['machine']['cpu']} ({model_result['machine']['cores']} cores)"
    assert page.count(machine) >= 3 and "Test CPU 9000 (2 cores)" in page
    # Plots are embedded with links relative to the page, and the links resolve.
    links = [line.split("](", 1)[1].rstrip(")") for line in page.splitlines() if line.startswith("![")]
    assert len(links) == 3  # model throughput; e2e throughput + stages
    assert all((page_path.parent / link).resolve().read_bytes().startswith(PNG_SIGNATURE) for link in links)


def test_report_reads_the_papers_data_when_present(written, tmp_path) -> None:
    from iws_engine.bench.report import PAPER_DATA_DIR

    if not (PAPER_DATA_DIR / "pipeline_b_gpu_inference.json").is_file():
        pytest.skip(f"paper data absent: {PAPER_DATA_DIR}")
    page = render_report(written[0], tmp_path / "REPORT.md").read_text()
    assert "data/pipeline_b_gpu_inference.json" in page and "NVIDIA L40" in page and "3,396" in page


# ----------------------------------------------------------------------------- commands

def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_and_report_commands(random_weights, tmp_path, capsys) -> None:
    out = tmp_path / "results"
    args = _parse(bench_cmd, ["--mode", "e2e", "--config", "onnxruntime:fp32", "--batch-sizes", "2", "--runs", "2",
                              "--warmup", "0", "--n", "4", "--size", "48x40", "--weights", str(random_weights),
                              "-o", str(out), "--report"])
    assert args.configs == [BenchConfig("onnxruntime", "fp32", "cpu")] and args.size == (48, 40)
    assert bench_cmd.run(args) == 0
    captured = capsys.readouterr()
    assert "| onnxruntime:fp32:cpu | 2 |" in captured.out and "randomly initialised" in captured.err
    [result_file] = out.glob("bench-*-e2e-*.json")
    assert json.loads(result_file.read_text())["protocol"]["size"] == "48x40"
    assert (out / "REPORT.md").is_file()

    assert report_cmd.run(_parse(report_cmd, ["--results", str(out), "-o", str(tmp_path / "R.md")])) == 0
    assert "Against the paper" in (tmp_path / "R.md").read_text()
    assert report_cmd.run(_parse(report_cmd, ["--results", str(tmp_path / "empty")])) == 2
    assert "no bench results" in capsys.readouterr().err

    args = _parse(bench_cmd, ["--config", "nosuch:fp32", "--n", "1", "--weights", str(random_weights), "-o", str(out)])
    assert bench_cmd.run(args) == 2
    assert "nosuch" in capsys.readouterr().err


def test_bench_command_argument_errors() -> None:
    for argv in (["--config", "torch"], ["--batch-sizes", "0,4"], ["--runs", "0"], ["--warmup", "-1"],
                 ["--size", "64"], ["--mode", "fast"]):
        with pytest.raises(SystemExit):
            _parse(bench_cmd, argv)
    defaults = _parse(bench_cmd, [])
    assert (defaults.mode, defaults.batch_sizes, defaults.runs, defaults.warmup, defaults.n_images) == ("model", (1, 16, 64), 5, 2, 256)
    assert defaults.configs is None and defaults.output_dir == Path("bench/results")
    assert _parse(report_cmd, []).results == Path("bench/results")


def test_e2e_loader_choice_side_by_side(random_weights) -> None:
    """Loaders are part of a configuration; one that cannot run here is recorded, not fatal."""
    configs = [BenchConfig.parse("onnxruntime:fp32:cpu@cpu"), BenchConfig.parse("onnxruntime:fp32:cpu@gpu")]
    result = run_bench(configs, mode="e2e", batch_sizes=(2,), runs=1, warmup=0, n_images=2, size=(32, 32),
                       weights=random_weights)
    records = {c["label"]: c for c in result["configs"]}
    assert records["onnxruntime:fp32:cpu@cpu"].get("error") is None
    assert records["onnxruntime:fp32:cpu@cpu"]["loader"] == "cpu"
    assert records["onnxruntime:fp32:cpu@gpu"]["error"]  # no CUDA/CuPy/nvCOMP on this machine
    assert [r["config"] for r in result["rows"]] == ["onnxruntime:fp32:cpu@cpu"]


# ----------------------------------------------------------------------------- pipeline A (eva02xgb)

EVA_TINY = dict(batch_sizes=(2,), runs=1, warmup=0, n_images=4, size=(64, 64), pipeline="eva02xgb", eva_config="tiny")
PIPELINE_A = "EVA02-L/14-448 + XGBoost (pipeline A)"


@pytest.fixture(scope="module")
def xgboost_model() -> Path:
    pytest.importorskip("xgboost")
    return require(XGBOOST_MODEL)


@pytest.fixture(scope="module")
def eva_model_result(xgboost_model) -> dict[str, Any]:
    """Model only, the random tiny EVA02."""
    return run_bench([BenchConfig("torch")], mode="model", xgboost=xgboost_model, **EVA_TINY)


@pytest.fixture(scope="module")
def eva_e2e_result(xgboost_model, tiny_eva02_weights) -> dict[str, Any]:
    """End to end, the tiny EVA02 from a weights file."""
    return run_bench([BenchConfig("torch")], mode="e2e", weights=tiny_eva02_weights, xgboost=xgboost_model, **EVA_TINY)


def _check_pipeline_a(result: dict[str, Any], mode: str) -> None:
    assert result["schema"] == SCHEMA and result["mode"] == mode and result["pipeline"] == PIPELINE_A
    model = result["model"]
    assert model["pipeline"] == "eva02xgb" and model["eva_config"] == "tiny"
    assert model["input_shape"] == [3, 56, 56] and model["output_shape"] == [1000]
    assert "+xgb:pipeline_a_xgboost@" in model["id"] and model["xgboost"] == "pipeline_a_xgboost.json"
    assert "xgboost" in result["libraries"] and "torch" in result["libraries"]
    [row] = result["rows"]
    assert row["config"] == "torch:fp32:cpu" and row["batch_size"] == 2 and row["images"] == 4
    assert row["throughput_img_s"]["mean"] > 0 and row["latency_ms"]["batches"] == 2
    assert result["configs"][0]["load_s"] > 0 and "error" not in result["configs"][0]


def test_pipeline_a_model_mode(eva_model_result) -> None:
    _check_pipeline_a(eva_model_result, "model")
    model = eva_model_result["model"]
    assert model["xgboost_device"] is None and not model["trained"] and "random-untrained" in model["id"]
    assert "XGBoost not run" in eva_model_result["protocol"]["inputs"]
    [row] = eva_model_result["rows"]
    assert "stages" not in row and "xgboost_share" not in row


def test_pipeline_a_e2e_mode_times_xgboost(eva_e2e_result) -> None:
    _check_pipeline_a(eva_e2e_result, "e2e")
    model = eva_e2e_result["model"]
    assert model["xgboost_device"] == "cpu" and model["trained"] and model["id"].startswith("eva02_tiny@")
    [row] = eva_e2e_result["rows"]
    stages, wall = row["stages"], row["wall_s"]["per_run"]
    xgboost, inference = stages["xgboost"]["seconds"]["per_run"], stages["inference"]["seconds"]["per_run"]
    assert stages["xgboost"]["clock"] == "wall"
    assert stages["xgboost"]["ms_per_img"] == pytest.approx(1000 * stages["xgboost"]["seconds"]["mean"] / 4)
    assert all(0 < x <= i <= w for x, i, w in zip(xgboost, inference, wall))  # a part of inference, of the pass
    share = row["xgboost_share"]
    assert share["per_run"] == pytest.approx([x / w for x, w in zip(xgboost, wall)])
    assert 0 < share["mean"] < 1


def test_pipeline_a_outputs(eva_model_result, eva_e2e_result, model_result, tmp_path) -> None:
    assert "-eva02xgb-" not in output_stem(model_result)  # SAR_CNN names unchanged
    assert output_stem(model_result).endswith(f"-model-{model_result['date']}-{model_result['commit']}")
    for result in (eva_model_result, eva_e2e_result):
        stem = output_stem(result)
        assert stem.startswith("bench-") and stem.endswith(
            f"-eva02xgb-{result['mode']}-{result['date']}-{result['commit']}")
    paths = write_outputs(eva_e2e_result, tmp_path)
    assert paths["json"].name == output_stem(eva_e2e_result) + ".json"
    assert paths["stages_plot"].read_bytes().startswith(PNG_SIGNATURE)
    page = paths["markdown"].read_text()
    assert "iws-engine bench, pipeline A e2e:" in page and "XGBoost on cpu" in page
    table = markdown_table(eva_e2e_result).splitlines()
    assert table[0].endswith("| inference ms/img | xgboost ms/img | XGBoost share of wall |")
    assert table[2].startswith("| torch:fp32:cpu | 2 |") and table[2].endswith(" % |")
    assert "xgboost" not in markdown_table(eva_model_result) and "xgboost" not in markdown_table(model_result)


def _as_pipeline_a(result: dict[str, Any], mode: str, commit: str) -> dict[str, Any]:
    """A synthetic pipeline A result on an H100 (from a SAR_CNN one: only the fields the report reads change)."""
    result = json.loads(json.dumps(result))
    result.update(mode=mode, commit=commit, pipeline=PIPELINE_A)
    result["model"].update(pipeline="eva02xgb", id="eva02_large@0123+xgb:pipeline_a_xgboost@4567",
                           eva_config="large", xgboost_device="cuda", trained=True)
    result["machine"]["gpu"] = {"name": "NVIDIA H100 80GB HBM3"}
    template = result["rows"][0]
    rows = []
    for config, rate in (("torch:fp32:cuda", 120.0), ("torch:bf16:cuda", 250.0), ("inductor:bf16:cuda", 700.0)):
        backend, precision, device = config.split(":")
        row = json.loads(json.dumps(template))
        row.update(config=config, backend=backend, precision=precision, device=device, batch_size=64,
                   throughput_img_s={"mean": rate, "std": 0.0, "per_run": [rate] * template["runs"]},
                   xgboost_share={"mean": 0.04, "std": 0.0, "per_run": [0.04] * template["runs"]},
                   gpu={"allocator_peak_mb": 4321.0})
        rows.append(row)
    result.update(rows=rows, baseline="torch:fp32:cuda", throughput_img_s=700.0,
                  best={"config": "inductor:bf16:cuda", "batch_size": 64, "throughput_img_s": 700.0})
    return result


def test_report_renders_both_pipelines(written, model_result, tmp_path) -> None:
    from iws_engine.bench.report import latest_results, pipeline_a_goal

    out = tmp_path / "results"
    out.mkdir()
    for path in written[0].glob("bench-*.json"):  # the SAR_CNN model and e2e results
        (out / path.name).write_text(path.read_text())
    e2e_a = _as_pipeline_a(model_result, "e2e", "aaa0001")
    for result in (e2e_a, _as_pipeline_a(model_result, "model", "aaa0002")):
        (out / f"{output_stem(result)}.json").write_text(json.dumps(result))
    goal = pipeline_a_goal(e2e_a)
    assert goal["config"] == "inductor:bf16:cuda" and goal["meets_throughput"]
    assert goal["vs_eager_bf16"] == pytest.approx(2.8) and goal["meets_ratio"]

    benches, _ = latest_results(out)
    assert sorted(r["model"].get("pipeline", "sarcnn") for _p, r in benches) == ["eva02xgb", "eva02xgb", "sarcnn",
                                                                                 "sarcnn"]
    page = render_report(out, tmp_path / "REPORT.md", paper_data_dir=tmp_path / "no-paper-data").read_text()
    assert "Against the paper (pipeline B, SAR_CNN)" in page and "3,396" in page
    section_a = page.split("## Against the paper (pipeline A, EVA02-L/14-448 + XGBoost)", 1)[1].split("\n## ", 1)[0]
    assert "25.6 img/s on NVIDIA L40" in section_a and "0.92 img/s on 56 CPU cores" in section_a
    assert "include PNG loading" in section_a and "4.0 %" in section_a and "4,321" in section_a
    assert "NVIDIA H100 80GB HBM3" in section_a and "inductor:bf16:cuda" in section_a
    assert "tiny" not in section_a and "iws-engine bench e2e, torch:fp32:cpu" not in section_a  # SAR_CNN stays in B
    assert "Goal (issue #5)" in section_a and "700.0 img/s (met)" in section_a and "2.80× torch:bf16:cuda" in section_a
    assert "paper pipeline A GPU on NVIDIA L40" in page and "paper pipeline B GPU on NVIDIA L40" in page
    assert "pipeline A, iws-engine bench e2e, inductor:bf16:cuda, batch 64" in page  # A's projection: its best e2e
    assert "iws-engine bench, pipeline A e2e:" in page and "iws-engine bench, pipeline A model:" in page

    for path in out.glob("bench-*.json"):  # pipeline A alone: no pipeline B comparison
        if "-eva02xgb-" not in path.name:
            path.unlink()
    page = render_report(out, tmp_path / "A.md", paper_data_dir=tmp_path / "no-paper-data").read_text()
    assert "pipeline A, EVA02-L/14-448 + XGBoost" in page and "pipeline B, SAR_CNN" not in page
    assert "paper pipeline B GPU" not in page and "Archive pass" in page


def test_paper_pipeline_a_figures(tmp_path) -> None:
    from iws_engine.bench.report import PAPER_DATA_DIR, PAPER_PIPELINE_A, paper_pipeline_a

    fallback = paper_pipeline_a(tmp_path)
    assert fallback["gpu"]["throughput_img_s"] == PAPER_PIPELINE_A["gpu"]["throughput_img_s"]
    assert fallback["gpu"]["source"] == "paper Tables 3–4"
    if not (PAPER_DATA_DIR / "pipeline_a_gpu_inference.json").is_file():
        pytest.skip(f"paper data absent: {PAPER_DATA_DIR}")
    figures = paper_pipeline_a()
    gpu, cpu = figures["gpu"], figures["cpu"]
    assert gpu["throughput_img_s"] == pytest.approx(25.64, abs=0.01) and gpu["batch_size"] == 128
    assert gpu["machine"] == "NVIDIA L40" and gpu["energy_mj_per_img_gross"] == pytest.approx(11690, abs=1)
    assert "data/pipeline_a_gpu_inference.json" in gpu["source"] and "data/pipeline_a_gpu_power.json" in gpu["source"]
    assert cpu["throughput_img_s"] == pytest.approx(0.92, abs=0.01)
    assert "data/pipeline_a_cpu_inference.json" in cpu["source"]
    for kind in ("gpu", "cpu"):  # the constants are the data files' figures
        for key, value in PAPER_PIPELINE_A[kind].items():
            assert figures[kind][key] == pytest.approx(value) if isinstance(value, float) else figures[kind][key] == value


def test_bench_command_model_option(random_weights) -> None:
    """--model means what it means for classify; contradictory model options are refused."""
    for argv, expected in ((["--model", str(random_weights)], ("sarcnn", random_weights)),
                           (["--weights", str(random_weights)], ("sarcnn", random_weights)),
                           (["--model", "sarcnn"], ("sarcnn", None)),
                           (["--model", "eva02xgb", "--xgboost", "x.json", "--weights", "eva.pth"],
                            ("eva02xgb", Path("eva.pth")))):
        assert bench_cmd._pipeline(_parse(bench_cmd, argv)) == expected
    for argv, message in ((["--model", "eva02xgb"], "needs --xgboost"),
                          (["--xgboost", "x.json"], "only used with --model eva02xgb"),
                          (["--model", str(random_weights), "--weights", str(random_weights)], "give one")):
        with pytest.raises(ValueError, match=message):
            bench_cmd._pipeline(_parse(bench_cmd, argv))
    assert _parse(bench_cmd, []).eva_config == "large"
    with pytest.raises(SystemExit):
        _parse(bench_cmd, ["--eva-config", "huge"])


def test_bench_cli_pipeline_a(xgboost_model, tmp_path) -> None:
    out = tmp_path / "results"
    done = run_cli("bench", "--model", "eva02xgb", "--eva-config", "tiny", "--xgboost", xgboost_model, "--n", 4,
                   "--runs", 1, "--warmup", 0, "--batch-sizes", 2, "--size", "64x64", "-o", out)
    assert done.returncode == 0, done.stderr
    [result_file] = out.glob("bench-*-eva02xgb-model-*.json")
    result = json.loads(result_file.read_text())
    assert result["pipeline"] == PIPELINE_A and result["model"]["eva_config"] == "tiny"
    labels = [c.label for c in default_configs(bench_cmd._cuda_available(), "eva02xgb")]
    assert [c["label"] for c in result["configs"]] == labels  # on this CPU: torch and onnxruntime fp32
    assert f"| {labels[0]} | 2 |" in done.stdout and "randomly initialised" in done.stderr

    missing = run_cli("bench", "--model", "eva02xgb", "--eva-config", "tiny", "-o", out)
    assert missing.returncode == 2
    assert "--model eva02xgb needs --xgboost FILE" in missing.stderr and "Traceback" not in missing.stderr
