"""End-to-end CPU classification: every input yields a score or an error row, in order."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from iws_engine.api import Classifier
from iws_engine.export import weights
from iws_engine.outputs import RowWriter, read_rows
from tests.conftest import run_cli


def test_every_input_gets_a_row_in_order(random_weights, mixed_inputs, tmp_path):
    missing = tmp_path / "does_not_exist.png"
    with Classifier(random_weights, batch_size=3) as clf:
        rows = list(clf.classify([mixed_inputs, missing]))
    paths = [r.path for r in rows]
    assert len(rows) == 5 + 3 + 3 + 1
    assert paths[:-1] == sorted(paths[:-1]) and paths[-1] == str(missing)
    errors = {r.path.rsplit("/", 1)[-1]: r.error for r in rows if not r.ok}
    assert set(errors) == {"truncated.png", "not_a_png.png", "empty.png", "does_not_exist.png"}
    assert all(str(mixed_inputs) in e or str(missing) in e for e in errors.values())
    assert "signature" in errors["not_a_png.png"].lower()
    assert "no such file" in errors["does_not_exist.png"].lower()
    for r in rows:
        if r.ok:
            assert 0.0 <= r.score <= 1.0 and r.decision == int(r.score >= 0.5) and r.error is None
        else:
            assert r.score is None and r.decision is None
    assert clf.last_stats.images == 12 and clf.last_stats.failed == 4


def test_scores_do_not_depend_on_batching_or_backend(random_weights, mixed_inputs):
    results = {}
    for backend, batch in (("onnxruntime", 1), ("onnxruntime", 7), ("torch", 4)):
        with Classifier(random_weights, backend=backend, batch_size=batch) as clf:
            results[(backend, batch)] = [r.score for r in clf.classify([mixed_inputs]) if r.ok]
    base = np.array(results[("onnxruntime", 7)])
    assert len(base) == 8
    for key, scores in results.items():
        np.testing.assert_allclose(scores, base, atol=2e-6, err_msg=str(key))


def test_bytes_input_and_predict(random_weights, mixed_inputs):
    data = sorted((mixed_inputs / "a").glob("*.png"))[0].read_bytes()
    with Classifier(random_weights) as clf:
        (row_file,) = clf.classify([sorted((mixed_inputs / "a").glob("*.png"))[0]])
        row_bytes, row_bad = clf.classify([data, b"\x89PNG\r\n\x1a\nbroken"])
        probs = clf.predict(np.zeros((3, 1, 256, 256), np.float32))
    assert row_bytes.score == pytest.approx(row_file.score, abs=1e-7)
    assert row_bad.error and "<bytes" in row_bad.error
    assert probs.shape == (3,) and np.all((probs > 0) & (probs < 1))


def test_iws_model_declares_threshold_047(iws_weights):
    with Classifier(iws_weights) as clf:
        assert clf.threshold == 0.47
    with Classifier(iws_weights, threshold=0.6) as clf:
        assert clf.threshold == 0.6
    with pytest.raises(ValueError, match="threshold"):
        Classifier(iws_weights, threshold=1.5)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_output_formats_round_trip(random_weights, mixed_inputs, tmp_path, suffix):
    with Classifier(random_weights) as clf:
        rows = list(clf.classify([mixed_inputs]))
    out = tmp_path / f"out{suffix}"
    with RowWriter(out) as w:
        for r in rows:
            w.write(r)
    back = read_rows(out)
    assert [r.path for r in back] == [r.path for r in rows]
    assert [r.error for r in back] == [r.error for r in rows]
    for a, b in zip(back, rows):
        assert (a.score is None) == (b.score is None)
        if a.score is not None:
            assert a.score == pytest.approx(b.score, rel=1e-7) and a.decision == b.decision


def test_cli_classify_exit_status_and_output(random_weights, mixed_inputs, tmp_path):
    out = tmp_path / "r.jsonl"
    bad = run_cli("classify", mixed_inputs, "--model", random_weights, "-o", out, "--batch-size", "4")
    assert bad.returncode == 1, bad.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 11 and sum(1 for x in lines if x["error"]) == 3
    assert "3 failed" in bad.stderr and "randomly initialised" in bad.stderr
    good = run_cli("classify", mixed_inputs / "a", "--model", random_weights, "--threshold", "0.3")
    assert good.returncode == 0, good.stderr
    csv_lines = good.stdout.strip().splitlines()
    assert csv_lines[0] == "path,score,decision,threshold,model_id,error" and len(csv_lines) == 6
    assert all(line.split(",")[3] == "0.3" for line in csv_lines[1:])
    usage = run_cli("classify", mixed_inputs, "--threshold", "2")
    assert usage.returncode == 2 and "threshold must be within" in usage.stderr


def test_cli_import_lux(lux_checkpoint, tmp_path):
    out = tmp_path / "iws.safetensors"
    r = run_cli("import-lux", lux_checkpoint, "-o", out)
    assert r.returncode == 0, r.stderr
    assert weights.load(out).meta.source_timestamp == "20260302_202405"
    bad = tmp_path / "bad.jld2"
    bad.write_bytes(b"nope")
    r = run_cli("import-lux", bad, "-o", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "not a readable JLD2" in r.stderr


def test_import_is_light():
    code = ("import sys, iws_engine, iws_engine.cli; "
            "heavy = {'torch', 'tensorrt', 'torch_tensorrt', 'cupy', 'nvidia.nvcomp', 'nvidia.dali', 'pynvml', 'onnxruntime'}; "
            "print(sorted(heavy & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_cli_synth_then_train_writes_a_documented_model(tmp_path):
    data = tmp_path / "d"
    r = run_cli("synth", data, "--n", "12", "--format", "gray8", "--size", "96x80", "--seed", "5", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert len(list(data.glob("*.png"))) == 12 and (data / "labels.csv").read_text().count("\n") == 13
    out, record = tmp_path / "m.safetensors", tmp_path / "m.json"
    r = run_cli("train", "-o", out, "--data", data, "--val-data", data, "--epochs", "1", "--batch-size", "6",
             "--record", record, "--seed", "3")
    assert r.returncode == 0, r.stderr
    w = weights.load(out)
    rec = json.loads(record.read_text())
    assert w.meta.trained and w.meta.extra["training"] == rec
    assert rec["config"]["seed"] == 3 and rec["data"]["n_train"] == 12 and len(rec["history"]) == 1
    assert rec["command"].startswith("iws-engine train")
    # normalisation statistics were measured on the training data, not copied from the IWS checkpoint
    assert 0.05 < w.meta.preprocess.std < 0.5 and w.meta.preprocess.mean != pytest.approx(0.37975472)


def test_weights_files_are_checked(random_weights, tmp_path):
    loaded = weights.load(random_weights)
    assert loaded.meta.model == "sarcnn" and loaded.meta.trained is False and len(loaded.sha256) == 64
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage" * 3)
    with pytest.raises(ValueError, match="not a safetensors file"):
        weights.load(garbage)
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"  # valid safetensors, but no iws-engine record
    save_file({"w": np.zeros(3, np.float32)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an iws-engine weights file"):
        weights.load(foreign)
    with pytest.raises(ValueError, match="cannot read weights"):
        weights.load(tmp_path / "missing.safetensors")


def test_cpu_loader_batch_tensors_are_filled_in_place_and_never_reused():
    """Workers write each input into its batch tensor's slot; a batch with failures holds only its good rows;
    a batch kept by the caller is not overwritten by later ones."""
    from iws_engine.export.synth import encode_png, render_vignette
    from iws_engine.loaders.cpu import CpuLoader
    from iws_engine.preprocess import PreprocessSpec

    spec = PreprocessSpec(mean=0.38, std=0.156)
    good = [encode_png(render_vignette(np.random.default_rng(i), i % 2 == 0, 40, 48), "rgba16") for i in range(7)]
    items = [good[0], good[1], b"not a png", good[2], good[3], good[4], good[5], b"\x89PNG\r\n\x1a\n", good[6]]
    loader = CpuLoader(spec, batch_size=3, workers=2, prefetch_batches=1)
    batches = list(loader.batches(items))  # all kept: later batches must not overwrite earlier tensors
    assert [len(b.items) for b in batches] == [3, 3, 3]
    assert [b.ok for b in batches] == [[0, 1], [0, 1, 2], [0, 2]]
    assert all(b.inputs.shape == (len(b.ok), 1, *spec.size) and b.inputs.dtype == np.float32 for b in batches)
    expected = [loader.load_item(g, "x")[0] for g in good]
    got = [row for b in batches for row in b.inputs]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert "not a PNG" in batches[0].errors[2] and 1 in batches[2].errors
    # a batch without failures is its tensor itself (no copy); no two batches share memory
    assert batches[1].inputs.base is not None and batches[1].inputs.base.shape == (3, 1, *spec.size)
    assert not any(np.shares_memory(a.inputs, b.inputs) for i, a in enumerate(batches) for b in batches[i + 1:])
