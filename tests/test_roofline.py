"""bench/roofline.py: the model's multiply-accumulate count, the peak loops of bench/peak_ops.c, and the ceilings."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from iws_engine.bench import roofline


def _macs_by_hooks() -> int:
    """An independent count: the MACs of every Conv2d/Linear as it actually runs in the torch model."""
    torch = pytest.importorskip("torch")
    from iws_engine.export.models.sarcnn import INPUT_SHAPE, SarCNN

    model = SarCNN().eval()
    total = 0

    def conv_hook(m, _inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m, _inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.no_grad():
        model(torch.zeros(1, *INPUT_SHAPE))
    return total


def test_macs_per_image_match_the_model_as_it_runs():
    assert roofline.sarcnn_macs_per_image() == _macs_by_hooks()
    # the 2.64 GFLOP/img the project's engineering notes quote
    assert round(2 * roofline.sarcnn_macs_per_image() / 1e9, 2) == 2.64


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                               reason="no C compiler (gcc/cc) to build bench/peak_ops.c")


@needs_gcc
def test_peak_ops_measures_every_kind_or_says_unsupported(tmp_path):
    exe = roofline.build_peak_ops(tmp_path)
    for kind in roofline.KINDS:
        rate = roofline.measure_peak(exe, kind, 1, 0.05)
        assert rate is None or 1e8 < rate < 1e13, (kind, rate)  # 0.1 GMAC/s .. 10 TMAC/s on one core
    flags = _cpu_flags()
    for kind, flag in (("fp32", "avx512f"), ("bf16", "avx512_bf16"), ("int8", "avx512_vnni")):
        # supported exactly when the kernel says the CPU has the instructions
        assert (roofline.measure_peak(exe, kind, 1, 0.02) is not None) == (flag in flags), kind
    bad = subprocess.run([str(exe), "fp64", "0.01"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown kind" in bad.stderr


@needs_gcc
def test_run_turns_peaks_and_measurements_into_ceilings(tmp_path):
    model = {"rows": [
        {"config": "onnxruntime:fp32:cpu", "device": "cpu", "precision": "fp32", "batch_size": 16,
         "throughput_img_s": {"mean": 10.0}},
        {"config": "onnxruntime:fp32:cpu", "device": "cpu", "precision": "fp32", "batch_size": 32,
         "throughput_img_s": {"mean": 12.0}},
        {"config": "tensorrt:fp32:cuda", "device": "cuda", "precision": "fp32", "batch_size": 32,
         "throughput_img_s": {"mean": 9999.0}},
    ]}
    decode = {"per_core_decode": {"native": {"ms_min": 8.0}}}
    e2e = {"rows": [{"config": "onnxruntime:fp32:cpu", "device": "cpu", "precision": "fp32", "batch_size": 16,
                     "throughput_img_s": {"mean": 7.0}}]}
    (tmp_path / "m.json").write_text(json.dumps(model))
    (tmp_path / "d.json").write_text(json.dumps(decode))
    (tmp_path / "e.json").write_text(json.dumps(e2e))
    r = roofline.run(0.05, tmp_path / "m.json", tmp_path / "d.json", cores=1, e2e_json=tmp_path / "e.json")
    fp32 = r["ceilings"]["fp32"]
    peak = r["peaks"]["fp32"]["mac_per_s_all_cores"]
    macs = roofline.sarcnn_macs_per_image()
    assert fp32["model_img_s_ceiling"] == pytest.approx(peak / macs)
    assert fp32["model_img_s_measured"] == 12.0  # the best CPU row, not the GPU one
    assert fp32["fraction_of_ceiling"] == pytest.approx(12.0 / fp32["model_img_s_ceiling"])
    core_ms = 8.0 + 1e3 / fp32["model_img_s_ceiling"]
    assert fp32["e2e_img_s_ceiling"] == pytest.approx(1e3 / core_ms)
    assert fp32["archive_hours_at_ceiling"] == pytest.approx(17_000_000 * core_ms / 1e3 / 56 / 3600)
    assert fp32["e2e_img_s_measured"] == 7.0
    assert fp32["e2e_fraction_of_ceiling"] == pytest.approx(7.0 / fp32["e2e_img_s_ceiling"])
    assert "e2e_img_s_measured" not in r["ceilings"]["int8"]  # nothing measured for it
    md = roofline.to_markdown(r)
    assert "| fp32 |" in md and "12.0" in md


@needs_gcc
def test_main_writes_json_and_markdown(tmp_path):
    assert roofline.main(["--seconds", "0.02", "-o", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("roofline-*.json")
    doc = json.loads(Path(js).read_text())
    assert doc["schema"] == "iws-engine/bench-roofline/1" and doc["peaks"]["fp32"]["mac_per_s_one_core"] > 0
    assert js.with_suffix(".md").exists()
