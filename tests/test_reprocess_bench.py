"""bench/reprocess_bench.py: its configurations run the real commands, with the model options given to every one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iws_engine.bench import reprocess_bench


def test_model_arguments_and_label():
    assert reprocess_bench.model_arguments(None, None, None) == []
    args = reprocess_bench.model_arguments(Path("/m/iws.safetensors"), "openvino", "int8")
    assert args == ["--weights", "/m/iws.safetensors", "--backend", "openvino", "--precision", "int8"]
    assert reprocess_bench.model_label(Path("/m/iws.safetensors"), "openvino", "int8") == \
        "model iws.safetensors, openvino int8"
    assert reprocess_bench.model_label(None, None, None) == "embedded SAR_CNN, onnxruntime fp32"


def test_run_one_runs_classify_and_reprocess_with_the_model_options(tmp_path):
    data = tmp_path / "vignettes"
    reprocess_bench.write_vignettes(data, 12, "gray8", (64, 48))
    assert len(list(data.rglob("*.png"))) == 12
    configs = {c["name"]: c for c in reprocess_bench.configurations(with_ray=False)}
    model_args = reprocess_bench.model_arguments(None, "onnxruntime", "fp32")
    for name in ("classify", "reprocess default"):
        r = reprocess_bench.run_one(configs[name], data, tmp_path / "work", 12, model_args)
        assert r["command_img_s"] > 0 and r["pass_img_s"] > 0 and r["processes"] >= 1
    record = json.loads((tmp_path / "work" / "out" / "_run.json").read_text())
    assert record["model"]["precision"] == "fp32" and record["counts"]["rows"] == 12
    # the options reach the command line of every configuration
    with pytest.raises(RuntimeError, match="invalid choice: 'no-such-backend'"):
        reprocess_bench.run_one(configs["reprocess default"], data, tmp_path / "work", 12,
                                ["--backend", "no-such-backend"])
