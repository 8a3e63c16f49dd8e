"""bench/projection.py: the paper's operational projections (Tables 5-7) from measured throughput."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from iws_engine.bench import project_cmd
from iws_engine.bench.projection import (
    format_projection_markdown,
    project,
    project_from_bench,
    read_throughput,
)

from tests.conftest import IWS_REFERENCE as REFERENCE
DATA = REFERENCE / "data"
INFERENCE_FILES = {
    "a_gpu": "pipeline_a_gpu_inference.json",
    "a_cpu": "pipeline_a_cpu_inference.json",
    "b_gpu": "pipeline_b_gpu_inference.json",
    "b_cpu": "pipeline_b_cpu_inference.json",
}


def _paper_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"paper data {path} not present (needs the read-only checkout of ../shared/reference)")
    return path


def _throughput(key: str) -> float:
    with _paper_file(INFERENCE_FILES[key]).open(encoding="utf-8") as handle:
        return read_throughput(json.load(handle))


# Published projection figures, as printed in the paper's abstract (EGUsphere preprint
# egusphere-2026-1798) and in the "Key results" table of the paper's repository README
# (AIRCentre/iws-pipeline-comparison-gmd). The full Tables 5-7 are not in ../shared; these are the
# only published projection values we could check against.
PUBLISHED_ARCHIVE_PASS_DAYS_A_GPU = 7.7
PUBLISHED_ARCHIVE_PASS_HOURS_B_GPU = 1.4
PUBLISHED_ANNUAL_HOURS_R2_A_GPU = 384
PUBLISHED_ANNUAL_HOURS_R2_B_GPU = 2.9
PUBLISHED_GPU_SPEEDUP_B_OVER_A = 132  # "132 times faster on GPU (3,396 versus 25.6 images per second)"


@pytest.mark.reference
def test_measured_throughputs_are_the_papers() -> None:
    # Table 3 as quoted in data/README.md: 25.6, 0.92, 3,396 and 15.2 img/s.
    assert round(_throughput("a_gpu"), 1) == 25.6
    assert round(_throughput("a_cpu"), 2) == 0.92
    assert round(_throughput("b_gpu")) == 3396
    assert round(_throughput("b_cpu"), 1) == 15.2
    assert round(_throughput("b_gpu") / _throughput("a_gpu")) == PUBLISHED_GPU_SPEEDUP_B_OVER_A


@pytest.mark.reference
def test_published_projections_are_reproduced() -> None:
    a_gpu = project(_throughput("a_gpu"))
    b_gpu = project(_throughput("b_gpu"))
    assert round(a_gpu["archive_pass"]["days"], 1) == PUBLISHED_ARCHIVE_PASS_DAYS_A_GPU
    assert round(b_gpu["archive_pass"]["hours"], 1) == PUBLISHED_ARCHIVE_PASS_HOURS_B_GPU
    annual_a = {entry["retrains"]: entry["gpu_hours"] for entry in a_gpu["annual"]}
    annual_b = {entry["retrains"]: entry["gpu_hours"] for entry in b_gpu["annual"]}
    assert round(annual_a[2]) == PUBLISHED_ANNUAL_HOURS_R2_A_GPU
    assert round(annual_b[2], 1) == PUBLISHED_ANNUAL_HOURS_R2_B_GPU
    # The published 384 h needs the 365 days of daily feed on top of the two archive passes.
    assert round(2 * a_gpu["archive_pass"]["hours"]) == 368


def _assert_exact_relationships(result: dict[str, Any], throughput: float, daily: int, archive: int,
                                retrains: tuple[int, ...]) -> None:
    assert result["throughput_img_s"] == throughput
    assert result["daily_feed"]["seconds"] == pytest.approx(daily / throughput, rel=1e-15)
    assert result["daily_feed"]["minutes"] == pytest.approx(daily / throughput / 60, rel=1e-15)
    assert result["archive_pass"]["seconds"] == pytest.approx(archive / throughput, rel=1e-15)
    assert result["archive_pass"]["hours"] == pytest.approx(archive / throughput / 3600, rel=1e-15)
    assert result["archive_pass"]["days"] == pytest.approx(archive / throughput / 86400, rel=1e-15)
    assert [entry["retrains"] for entry in result["annual"]] == list(retrains)
    for entry in result["annual"]:
        r = entry["retrains"]
        assert entry["gpu_hours"] == pytest.approx((r * archive + 365 * daily) / throughput / 3600, rel=1e-14)
        assert entry["gpu_hours"] == pytest.approx(entry["archive_hours"] + entry["daily_feed_hours"], rel=1e-14)
        assert entry["archive_hours"] == pytest.approx(r * result["archive_pass"]["hours"], rel=1e-14)
    assert result["max_daily_images"] == pytest.approx(86400 * throughput, rel=1e-15)
    assert result["headroom"] == pytest.approx(86400 * throughput / daily, rel=1e-15)
    # Headroom is also "how many daily feeds fit in a day".
    assert result["headroom"] == pytest.approx(86400 / result["daily_feed"]["seconds"], rel=1e-14)


@pytest.mark.reference
@pytest.mark.parametrize("key", sorted(INFERENCE_FILES))
def test_projection_of_each_paper_configuration_is_self_consistent(key: str) -> None:
    throughput = _throughput(key)
    _assert_exact_relationships(project(throughput), throughput, 4000, 17_000_000, (2, 4))
    custom = project(throughput, daily_images=10_000, archive_images=1_000_000, retrains=(1, 12))
    _assert_exact_relationships(custom, throughput, 10_000, 1_000_000, (1, 12))


@pytest.mark.reference
def test_throughput_is_found_in_every_paper_layout() -> None:
    expected = {
        "pipeline_a_gpu_inference.json": 25.64419450832523,  # throughput_images_per_sec
        "pipeline_a_cpu_inference.json": 0.9222359722129527,
        "pipeline_b_gpu_inference.json": 3396.071058744879,  # timing_metrics.images_per_second
        "pipeline_b_cpu_inference.json": 15.20708416566176,  # performance.throughput.img_per_s
    }
    for name, throughput in expected.items():
        result = project_from_bench(_paper_file(name))
        assert result["throughput_img_s"] == throughput, name
        assert result["bench_file"].endswith(name)
    assert project_from_bench(_paper_file("pipeline_a_gpu_inference.json"))["source"] == "eva02_xgboost_iws (cuda)"
    # The power files record power and wall times, not a throughput: refused with a clear message.
    for name in ("pipeline_a_gpu_power.json", "pipeline_b_gpu_power.json"):
        with pytest.raises(KeyError, match="no throughput found"):
            project_from_bench(_paper_file(name))


def test_read_throughput_layouts_and_dotted_key() -> None:
    assert read_throughput({"throughput_img_s": 100}) == 100.0
    assert read_throughput({"performance": {"throughput": {"img_per_s": 15.2}}}) == 15.2
    assert read_throughput({"runs": {"best": {"ips": 7.5}}}, key="runs.best.ips") == 7.5
    with pytest.raises(KeyError):
        read_throughput({"runs": {}}, key="runs.best.ips")
    with pytest.raises(ValueError):
        read_throughput({"throughput_img_s": "fast"})


def test_project_rejects_nonsense() -> None:
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            project(bad)
    with pytest.raises(ValueError):
        project(10.0, daily_images=0)
    with pytest.raises(ValueError):
        project(10.0, retrains=(-1,))


def test_markdown_table() -> None:
    text = format_projection_markdown(project(3396.071058744879, source="SAR_CNN v2 (L40)"))
    lines = text.splitlines()
    assert lines[0] == "### Operational projection: SAR_CNN v2 (L40)"
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| Quantity | Value |"
    assert len(table) == 2 + 7  # header, rule, throughput, daily, archive, R=2, R=4, max volume, headroom
    assert all(line.count("|") == 3 for line in table)
    assert "| Archive pass (17,000,000 img) | 83.4 min (1.39 h) |" in lines
    assert any(line.startswith("| Annual GPU hours, R = 2") and line.endswith("| 2.9 h |") for line in lines)
    assert "| Max daily volume (86,400 s x throughput) | 293,420,539 img/day |" in lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    project_cmd.add_arguments(parser)
    return parser


def test_project_command_with_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["--throughput", "25.64419450832523"])
    assert project_cmd.run(args) == 0
    out = capsys.readouterr().out
    assert "| Archive pass (17,000,000 img) | 7.67 days (184.1 h) |" in out
    assert "| Annual GPU hours, R = 2 (R x archive + 365 days of feed) | 384.1 h |" in out

    args = _parser().parse_args(["--throughput", "100", "--daily", "8000", "--archive", "1_000_000",
                                 "--retrains", "1,3", "--json"])
    assert project_cmd.run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["volumes"] == {"daily_images": 8000, "archive_images": 1_000_000,
                                 "retrains": [1, 3], "days_per_year": 365}
    assert result["annual"][1]["gpu_hours"] == pytest.approx((3 * 1e6 + 365 * 8000) / 100 / 3600)
    assert result["headroom"] == pytest.approx(86400 * 100 / 8000)


def test_project_command_from_bench_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"pipeline": "sar_cnn_v2", "backend": "trt-fp16", "throughput_img_s": 50000.0}))
    assert project_cmd.run(_parser().parse_args(["--from", str(bench), "--json"])) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["throughput_img_s"] == 50000.0
    assert result["source"] == "sar_cnn_v2 (trt-fp16)"

    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"summary": {"img_s": 12.5}}))
    assert project_cmd.run(_parser().parse_args(["--from", str(nested)])) == 2
    assert "no throughput found" in capsys.readouterr().err
    assert project_cmd.run(_parser().parse_args(["--from", str(nested), "--throughput-key", "summary.img_s"])) == 0
    assert "12.5 img/s" in capsys.readouterr().out

    assert project_cmd.run(_parser().parse_args(["--from", str(tmp_path / "missing.json")])) == 2
    assert "missing.json" in capsys.readouterr().err


@pytest.mark.reference
def test_project_command_from_paper_inference_json(capsys: pytest.CaptureFixture[str]) -> None:
    path = _paper_file("pipeline_b_gpu_inference.json")
    assert project_cmd.run(_parser().parse_args(["--from", str(path)])) == 0
    out = capsys.readouterr().out
    assert "Julia_Lux_CNN_GPU" in out and "| 2.9 h |" in out


def test_project_command_argument_errors() -> None:
    parser = _parser()
    for argv in ([], ["--throughput", "10", "--from", "x.json"], ["--throughput", "-3"],
                 ["--throughput", "10", "--retrains", "two"], ["--throughput", "10", "--daily", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
