"""The Lux checkpoint importer against an independent float64 NumPy Lux forward.

The reference forward below reads the JLD2 with its own h5py code and computes in Julia's index
convention (x[row, col, channel], kernel w[k1, k2, in, out], NNlib true convolution with the
kernel flipped); it shares no code with iws_engine.export.lux.
"""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch

from iws_engine.export import lux, weights
from iws_engine.export.models import sarcnn


# ---------- independent reference (Julia semantics, float64) ----------
def _field(f, compound_value, dtype, *path):
    v, dt = compound_value, dtype
    for name in path:
        i = dt.names.index(name)
        v, dt = v[i], dt[i]
    return f[v]


def _lux_params(path):
    with h5py.File(path, "r") as f:
        ps, st, model = f["ps"], f["st"], f["model"]
        psv, stv, mv = ps[()], st[()], model[()]
        blocks = []
        for b in ("block1", "block2", "block3", "block4"):
            conv_struct = _field(f, mv, model.dtype, b, "conv")[()]
            bn_struct = _field(f, mv, model.dtype, b, "bn")[()]
            pool_ds = _field(f, mv, model.dtype, b, "pool")
            blocks.append(
                dict(
                    # h5py shows (out, in, k2, k1); Julia's kernel is w[k1, k2, in, out]
                    w=np.asarray(_field(f, psv, ps.dtype, b, "conv", "weight")[()], np.float64).transpose(3, 2, 1, 0),
                    b=np.asarray(_field(f, psv, ps.dtype, b, "conv", "bias")[()], np.float64),
                    scale=np.asarray(_field(f, psv, ps.dtype, b, "bn", "scale")[()], np.float64),
                    shift=np.asarray(_field(f, psv, ps.dtype, b, "bn", "bias")[()], np.float64),
                    mean=np.asarray(_field(f, stv, st.dtype, b, "bn", "running_mean")[()], np.float64),
                    var=np.asarray(_field(f, stv, st.dtype, b, "bn", "running_var")[()], np.float64),
                    eps=float(bn_struct[0]),
                    stride=int(conv_struct[3][0]),
                    pad=int(conv_struct[4][0]),
                    pool=pool_ds.dtype.names is not None,
                )
            )
        dense = [
            (
                np.asarray(_field(f, psv, ps.dtype, "classifier", d, "weight")[()], np.float64).T,  # Julia (out, in)
                np.asarray(_field(f, psv, ps.dtype, "classifier", d, "bias")[()], np.float64),
            )
            for d in ("dense1", "dense2")
        ]
    return blocks, dense


def _julia_conv(x, w, bias, stride, pad):
    """NNlib conv (flipped=false: true convolution) of x[r, c, in] with w[k1, k2, in, out]."""
    k1, k2 = w.shape[:2]
    wf = w[::-1, ::-1]  # true convolution = correlation with the flipped kernel
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    o1 = (xp.shape[0] - k1) // stride + 1
    o2 = (xp.shape[1] - k2) // stride + 1
    y = np.zeros((o1, o2, w.shape[3]))
    for a in range(k1):
        for b in range(k2):
            patch = xp[a : a + stride * o1 : stride, b : b + stride * o2 : stride, :]
            y += patch @ wf[a, b]
    return y + bias


def lux_forward_reference(blocks, dense, image):
    x = image[:, :, None].astype(np.float64)
    for blk in blocks:
        x = _julia_conv(x, blk["w"], blk["b"], blk["stride"], blk["pad"])
        x = (x - blk["mean"]) / np.sqrt(blk["var"] + blk["eps"]) * blk["scale"] + blk["shift"]
        x = np.maximum(x, 0)
        if blk["pool"]:
            h, w, c = x.shape
            x = x[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))
    x = x.mean(axis=(0, 1))
    (w1, b1), (w2, b2) = dense
    x = np.maximum(w1 @ x + b1, 0)
    return float((w2 @ x + b2)[0])


# ---------- fixtures ----------
def probe_images():
    rng = np.random.default_rng(20260302)
    rows, cols = np.mgrid[0:256, 0:256]
    return {
        "noise": rng.standard_normal((256, 256)),
        "horizontal_stripes": np.sin(2 * np.pi * rows / 9.0) + 0.3 * (rows / 256.0),
        "vertical_stripes": np.sin(2 * np.pi * cols / 9.0) - 0.3 * (cols / 256.0),
        "corner_ramp": (rows * 2.0 + cols) / 384.0 - 1.0,
    }


@pytest.fixture(scope="module")
def reference(lux_checkpoint):
    blocks, dense = _lux_params(lux_checkpoint)
    images = probe_images()
    return {name: lux_forward_reference(blocks, dense, img) for name, img in images.items()}


def torch_logits(model, dtype=torch.float64):
    images = probe_images()
    x = torch.from_numpy(np.stack(list(images.values()))[:, None]).to(dtype)
    with torch.no_grad():
        y = model.to(dtype)(x)[:, 0].double().numpy()
    return dict(zip(images, y))


# ---------- tests ----------
def test_parameter_count_matches_table1(iws_weights):
    model = sarcnn.from_weights(weights.load(iws_weights))
    assert sum(p.numel() for p in model.parameters()) == sarcnn.TOTAL_PARAMS == 283_329
    assert sarcnn.count_params_per_layer(model) == sarcnn.TABLE1_PARAMS


def test_checkpoint_architecture_read_from_file(lux_checkpoint):
    ckpt = lux.read_checkpoint(lux_checkpoint)
    assert [b.conv.kernel for b in ckpt.blocks] == [(7, 7), (5, 5), (3, 3), (3, 3)]
    assert [b.conv.stride for b in ckpt.blocks] == [(2, 2), (1, 1), (1, 1), (1, 1)]
    assert [b.pool for b in ckpt.blocks] == [None, (2, 2), (2, 2), (2, 2)]
    assert all(b.conv.cross_correlation is False for b in ckpt.blocks)
    assert ckpt.blocks[0].bn_epsilon == pytest.approx(1e-5, rel=1e-6)
    assert ckpt.norm_mean == pytest.approx(0.37975, abs=1e-5)
    assert ckpt.norm_std == pytest.approx(0.15608, abs=1e-5)
    assert ckpt.timestamp == "20260302_202405"


def test_metadata_stored_with_weights(iws_weights, lux_checkpoint):
    w = weights.load(iws_weights)
    m = w.meta
    assert m.model == "sarcnn" and m.trained and m.threshold == 0.47
    assert m.source_sha256 == lux.sha256_file(lux_checkpoint)
    assert m.source_timestamp == "20260302_202405"
    assert m.converter.endswith(lux.CONVERTER_VERSION)
    assert m.cross_correlation is False
    assert m.preprocess.mean == float(np.float32(0.37975472))
    assert m.preprocess.size == (256, 256) and m.preprocess.order == "resize-then-grey"


def test_logits_equal_independent_lux_forward(iws_weights, reference):
    model = sarcnn.from_weights(weights.load(iws_weights))
    got64 = torch_logits(model, torch.float64)
    got32 = torch_logits(model, torch.float32)
    for name, want in reference.items():
        assert abs(got64[name] - want) <= 1e-5, (name, got64[name], want)
        assert abs(got32[name] - want) <= 1e-4, (name, got32[name], want)
    # the probes are not degenerate: they give different logits
    assert np.ptp(list(reference.values())) > 0.1


@pytest.mark.parametrize("mistake", ["no_flip", "swapped_axes", "flip_rows_only"])
def test_wrong_mapping_is_detected(iws_weights, reference, mistake):
    loaded = weights.load(iws_weights)
    tensors = dict(loaded.tensors)
    for k, w in loaded.tensors.items():
        if k.endswith("conv.weight"):
            if mistake == "no_flip":
                tensors[k] = np.ascontiguousarray(w[:, :, ::-1, ::-1])
            elif mistake == "swapped_axes":
                tensors[k] = np.ascontiguousarray(w.transpose(0, 1, 3, 2))
            else:
                tensors[k] = np.ascontiguousarray(w[:, :, ::-1, :])
    wrong = sarcnn.from_weights(dataclasses.replace(loaded, tensors=tensors))
    got = torch_logits(wrong)
    worst = max(abs(got[n] - reference[n]) for n in reference)
    assert worst > 1e-3, f"{mistake} mapping was not detected (max |dlogit| = {worst})"


def test_architecture_mismatch_is_refused_with_reason(lux_checkpoint):
    ckpt = lux.read_checkpoint(lux_checkpoint)
    lux.check_sarcnn_v2(ckpt)  # the real one passes
    b2 = ckpt.blocks[1]
    bad = dataclasses.replace(
        ckpt,
        blocks=(ckpt.blocks[0], dataclasses.replace(b2, conv=dataclasses.replace(b2.conv, kernel=(3, 3))), *ckpt.blocks[2:]),
        dense=((128, 32, "NNlib.#relu"), (32, 1, "Base.#identity")),
    )
    with pytest.raises(lux.CheckpointError) as e:
        lux.check_sarcnn_v2(bad)
    msg = str(e.value)
    assert "block2 kernel_size is (3, 3), SAR_CNN v2 has (5, 5)" in msg
    assert "classifier Dense layers" in msg
    with pytest.raises(lux.CheckpointError, match="3 conv blocks"):
        lux.check_sarcnn_v2(dataclasses.replace(ckpt, blocks=ckpt.blocks[:3]))


def test_cross_correlation_flag_decides_the_flip():
    w = np.arange(2 * 3 * 5, dtype=np.float32).reshape(1, 2, 3, 5)  # h5py order (out, in, k2, k1)
    conv = lux.conv_weight_to_torch(w, cross_correlation=False)
    corr = lux.conv_weight_to_torch(w, cross_correlation=True)
    assert conv.shape == corr.shape == (1, 2, 5, 3)
    np.testing.assert_array_equal(corr, w.transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(conv, w.transpose(0, 1, 3, 2)[:, :, ::-1, ::-1])


def test_not_a_checkpoint_is_refused(tmp_path):
    bogus = tmp_path / "x.jld2"
    bogus.write_bytes(b"not hdf5")
    with pytest.raises(lux.CheckpointError, match="not a readable JLD2"):
        lux.read_checkpoint(bogus)
    with h5py.File(tmp_path / "empty.jld2", "w") as f:
        f["a"] = 1
    with pytest.raises(lux.CheckpointError, match="missing keys"):
        lux.read_checkpoint(tmp_path / "empty.jld2")
