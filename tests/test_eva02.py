"""export/models/eva02.py: EVA02-L/14-448 architecture, timm state-dict compatibility, weights loading.

CPU tests use the tiny configuration of the same architecture; the full model is only built on
the meta device (parameter count and names). The timm parity tests compare with timm's own Eva model
(timm and torchvision are pinned and installed by .ci/setup); see import_timm for how timm is imported on the
CPU machines, whose torchvision cannot load its compiled operators. They skip, saying why, where timm is absent.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.timmtools import (
    TORCHVISION_IMPORT_TIME_OPS,
    TORCHVISION_OPS_DECLARED,
    import_timm,
    torchvision_extension_error,
)
from iws_engine.export.models.eva02 import (
    TIMM_PARAM_COUNT,
    Eva02,
    Eva02Config,
    count_parameters,
    load_eva02_weights,
    random_eva02,
    rotary_sin_cos,
    rotate_pairs,
)

TINY = Eva02Config.tiny()


def expected_parameter_count(c: Eva02Config) -> int:
    """The architecture's parameters counted by hand, layer by layer."""
    d, h = c.embed_dim, int(c.embed_dim * c.mlp_ratio)
    patch_embed = c.in_chans * c.patch_size**2 * d + d
    tokens = d + (1 + (c.img_size // c.patch_size) ** 2) * d  # cls token + absolute position embedding
    attention = (d * d + d) + d * d + (d * d + d) + (d * d + d)  # q (bias), k (no bias), v (bias), proj
    swiglu = 2 * (d * h + h) + 2 * h + (h * d + d)  # fc1_g, fc1_x, inner LayerNorm, fc2
    block = 2 * d + attention + 2 * d + swiglu  # norm1, attn, norm2, mlp
    head = 2 * d + (d * c.num_classes + c.num_classes)  # fc_norm, head
    return patch_embed + tokens + c.depth * block + head


def expected_state_dict_keys(depth: int) -> list[str]:
    """timm's names for eva02_large_patch14_448, in timm's order (read from timm/models/eva.py:
    qkv_fused=False -> q_proj/k_proj/v_proj with no k bias; swiglu_mlp + scale_mlp -> SwiGLU
    fc1_g/fc1_x/norm/fc2; global_pool='avg' -> fc_norm, final norm Identity; no gamma_1/gamma_2)."""
    per_block = [
        "norm1.weight", "norm1.bias",
        "attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight", "attn.v_proj.weight", "attn.v_proj.bias",
        "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias",
        "mlp.fc1_g.weight", "mlp.fc1_g.bias", "mlp.fc1_x.weight", "mlp.fc1_x.bias",
        "mlp.norm.weight", "mlp.norm.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    ]  # fmt: skip
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{i}.{name}" for i in range(depth) for name in per_block]
    return keys + ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]


def randomised(model: Eva02, seed: int = 1) -> Eva02:
    """Every parameter drawn at O(1) scale, so logits are far from timm's near-zero initial head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            is_norm_weight = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + 0.2 * noise if is_norm_weight else 0.2 * noise)
    return model.eval()


def tiny_input(batch: int = 2, seed: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, TINY.img_size, TINY.img_size, generator=g, dtype=torch.float64).to(dtype)


# --- architecture -----------------------------------------------------------------------------------------


def test_full_model_parameter_count_on_meta() -> None:
    with torch.device("meta"):
        model = Eva02(Eva02Config())
    assert count_parameters(model) == expected_parameter_count(Eva02Config()) == TIMM_PARAM_COUNT == 305_080_232


def test_full_model_state_dict_names_and_shapes_are_timms() -> None:
    with torch.device("meta"):
        state = Eva02(Eva02Config()).state_dict()
    assert list(state) == expected_state_dict_keys(depth=24)
    assert tuple(state["pos_embed"].shape) == (1, 1 + 32 * 32, 1024)
    assert tuple(state["patch_embed.proj.weight"].shape) == (1024, 3, 14, 14)
    assert tuple(state["blocks.0.mlp.fc1_g.weight"].shape) == (2730, 1024)  # int(1024 * 8/3)
    assert tuple(state["head.weight"].shape) == (1000, 1024)


def test_rotary_tables_are_not_in_the_state_dict() -> None:
    model = Eva02(TINY)
    assert not any(k.startswith("rope") for k in model.state_dict())
    assert {name for name, _ in model.named_buffers()} == {"rope.sin", "rope.cos"}


def test_tiny_forward_shape_and_probabilities() -> None:
    model = random_eva02(TINY).model
    with torch.no_grad():
        logits = model(tiny_input())
    probabilities = model.probabilities(tiny_input())
    assert logits.shape == probabilities.shape == (2, 1000)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2), rtol=0, atol=1e-6)


def test_other_input_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="expected N×C×56×56 input"):
        Eva02(TINY)(torch.zeros(1, 3, 70, 70))


def test_rotary_tables_follow_the_2d_formula() -> None:
    """Token (row r, col c) of a G×G grid: channels [row bands, col bands], each band repeated twice,
    angle = (position / G * 16) * 10000^(-j / bands) (timm in_pixels=False, ref_feat_shape 16×16)."""
    sin, cos = rotary_sin_cos(TINY)
    grid, bands = TINY.grid_size, TINY.head_dim // 4
    freqs = 10000.0 ** (-np.arange(bands) / bands)
    for token in range(grid * grid):
        r, c = divmod(token, grid)
        angles = np.concatenate([r / grid * 16 * freqs, c / grid * 16 * freqs]).repeat(2)
        np.testing.assert_allclose(sin[token].numpy(), np.sin(angles), rtol=0, atol=2e-6)
        np.testing.assert_allclose(cos[token].numpy(), np.cos(angles), rtol=0, atol=2e-6)


def test_rotation_leaves_the_class_token_exactly_alone() -> None:
    model = Eva02(TINY)
    q = torch.randn(2, TINY.num_heads, 1 + TINY.num_patches, TINY.head_dim)
    rotated = model.rope(q)
    assert torch.equal(rotated[:, :, 0], q[:, :, 0])
    # patch tokens are rotated pairwise: each (x_2i, x_2i+1) pair keeps its length
    torch.testing.assert_close(rotated.unflatten(-1, (-1, 2)).norm(dim=-1), q.unflatten(-1, (-1, 2)).norm(dim=-1))


def test_rotate_pairs_layout() -> None:
    assert rotate_pairs(torch.tensor([0.0, 1, 2, 3, 4, 5])).tolist() == [-1.0, 0, -3, 2, -5, 4]


def test_fused_attention_equals_explicit_softmax_attention_fp64() -> None:
    model = randomised(Eva02(TINY)).double()
    x = tiny_input(dtype=torch.float64)
    with torch.no_grad():
        fused = model(x)
        for block in model.blocks:
            block.attn.fused = False
        explicit = model(x)
    assert fused.abs().max() > 0.1  # a meaningful comparison, not two near-zero heads
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-10)


# --- weights -------------------------------------------------------------------------------------------------


def test_random_model_says_it_is_untrained() -> None:
    loaded = random_eva02(TINY, seed=5)
    assert loaded.trained is False
    assert "random-untrained" in loaded.model_id and "seed=5" in loaded.model_id
    again = random_eva02(TINY, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), again.model.state_dict().values()))


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-wrapped"])
def test_weights_file_round_trip(tmp_path, fmt: str) -> None:
    source = randomised(Eva02(TINY), seed=7)
    state = source.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "eva02_tiny.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "eva02_tiny.pth"
        # original EVA checkpoints nest the weights and carry rotary buffers; both are handled like timm does
        payload = {"model": {**state, "rope.freqs_cos": torch.zeros(3)}} if fmt == "pth-wrapped" else state
        torch.save(payload, str(path))
    loaded = load_eva02_weights(path, TINY)
    assert loaded.trained is True and loaded.source == str(path)
    assert loaded.model_id.startswith("eva02_tiny@") and len(loaded.sha256) == 64
    assert loaded.model.rope.sin.device.type == "cpu"
    x = tiny_input()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), source(x))


def test_weights_for_another_configuration_are_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(Eva02(TINY).state_dict(), str(path))
    with pytest.raises(ValueError, match="do not match EVA02") as info:
        load_eva02_weights(path)  # the Large/448 configuration
    assert "embed_dim 1024, depth 24, 1025 tokens" in str(info.value)
    assert "the file holds embed_dim 64, depth 2, 17 tokens" in str(info.value)


def test_unreadable_weights_files_name_the_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match="no such weights file"):
        load_eva02_weights(tmp_path / "absent.safetensors", TINY)
    odd = tmp_path / "weights.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown weights format"):
        load_eva02_weights(odd, TINY)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_eva02_weights(broken, TINY)


# --- parity with timm -------------------------------------------------------------------------------------
#
# timm (pinned in .ci/setup, installed there with torchvision, both --no-deps) is the reference implementation of
# eva02_large_patch14_448. How it is imported on the CPU machines is explained in import_timm's docstring.

class DispatchedOps(TorchDispatchMode):
    """Records the namespace of every operator dispatched while active (aten, prims, torchvision, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.namespaces: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


def timm_eva02(timm, config: Eva02Config):
    """timm's own eva02_large_patch14_448 definition with the test-size overrides."""
    model = timm.create_model(
        "eva02_large_patch14_448",
        pretrained=False,
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        num_classes=config.num_classes,
    ).eval()
    assert (type(model).__module__, type(model).__name__) == ("timm.models.eva", "Eva")  # timm's class, not ours
    return model


def test_timm_full_model_has_our_parameter_count_and_names() -> None:
    timm = import_timm()
    with torch.device("meta"):
        reference = timm_eva02(timm, Eva02Config())
        ours = Eva02(Eva02Config())
    assert count_parameters(reference) == TIMM_PARAM_COUNT
    assert {k: v.shape for k, v in reference.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_timm_parity_on_identical_random_weights() -> None:
    timm = import_timm()
    ours = randomised(Eva02(TINY), seed=11)
    reference = timm_eva02(timm, TINY)
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = tiny_input(batch=3)
    with torch.no_grad():
        got, want = ours(x), reference(x)
        with DispatchedOps() as dispatched:
            again = reference(x)
    assert torch.equal(again, want)
    assert "aten" in dispatched.namespaces and "torchvision" not in dispatched.namespaces, dispatched.namespaces
    assert want.abs().max() > 0.1
    max_delta = (got - want).abs().max().item()
    assert max_delta <= 1e-4, f"max |Δlogit| = {max_delta:.3g}"
    # and the reverse direction: timm's own random weights load into ours
    ours.load_state_dict(timm_eva02(timm, TINY).state_dict(), strict=True)


def test_timm_torchvision_operators_are_declared_only_where_its_extension_cannot_load() -> None:
    """import_timm's contract: schemas without kernels, declared only when torchvision's _C did not load."""
    import_timm()
    import torchvision.extension

    if torchvision.extension._has_ops():  # a whole torchvision (the H100 machine)
        assert TORCHVISION_OPS_DECLARED == [] and torchvision_extension_error() is None
        return
    assert torchvision_extension_error() is not None  # e.g. "_C.so: libc10_cuda.so: cannot open shared object file"
    assert set(TORCHVISION_OPS_DECLARED) <= set(TORCHVISION_IMPORT_TIME_OPS)
    boxes, scores = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1.0])
    with pytest.raises(NotImplementedError):
        torch.ops.torchvision.nms(boxes, scores, 0.5)  # declared, no kernel: nothing can compute with it
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
        torchvision.ops.nms(boxes, scores, 0.5)  # torchvision's own guard says the same
    assert not hasattr(torch.ops.torchvision, "roi_align")  # no other torchvision operator exists here


def test_timm_rotary_tables_are_bit_identical() -> None:
    timm = import_timm()
    for config in (TINY, Eva02Config()):
        rope = timm.layers.RotaryEmbeddingCat(
            config.head_dim, in_pixels=False, feat_shape=[config.grid_size] * 2, ref_feat_shape=config.ref_feat_shape
        )
        timm_sin, timm_cos = rope.get_embed().chunk(2, -1)
        sin, cos = rotary_sin_cos(config)
        assert torch.equal(sin, timm_sin) and torch.equal(cos, timm_cos)


def test_expected_count_formula_matches_a_hand_figure() -> None:
    """305,080,232 = embed 603,136 + tokens 1,050,624 + 24 × 12,599,976 + head 1,027,048."""
    c = Eva02Config()
    assert 603_136 + 1_050_624 + 24 * 12_599_976 + 1_027_048 == expected_parameter_count(c)
    assert math.isclose(expected_parameter_count(c) / 1e6, 305.08, abs_tol=0.005)  # timm results CSV: 305.08 M
