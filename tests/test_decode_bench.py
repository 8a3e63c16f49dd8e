"""bench/decode_bench.py runs end to end at a small size and writes its JSON + Markdown (the figures come from a
quiet machine, not from here)."""

from __future__ import annotations

import json

import pytest

from iws_engine.loaders import native


def test_decode_bench_small(tmp_path) -> None:
    if not native.available():
        pytest.skip("the native decode core is not built (pip install -e . builds it)")
    from iws_engine.bench import decode_bench

    assert decode_bench.main(["--n", "6", "--runs", "2", "--single", "2", "--size", "48x40", "-o", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("decode-*-rgba16-*.json")
    r = json.loads(js.read_text())
    assert r["schema"] == "iws-engine/bench-decode/1"
    assert set(r["per_core_decode"]) == {"old_decode", "old_decode_preprocess", "native", "native_full_path",
                                         "native_parse_only", "native_bfloat16_out"}
    assert set(r["decode_threads"]) == {"native_1_threads", "native_2_threads", "old_1_threads", "old_2_threads"}
    assert set(r["end_to_end"]) == {"native", "old"} and r["throughput_img_s"] == r["end_to_end"]["native"]["img_per_s_mean"]
    p = r["projection"]
    assert p["archive_hours"] == pytest.approx(17_000_000 / (p["per_core_img_s"] * 56) / 3600)
    assert all(s["ms_min"] > 0 for s in r["per_core_decode"].values())
    md = js.with_suffix(".md").read_text()
    assert "old_decode" in md and "archive" in md
    assert set(r["general_decode"]) == {"adam7", "palette8"}
    assert all(s["ms_min"] > 0 for s in r["general_decode"].values()) and "Adam7" in md
