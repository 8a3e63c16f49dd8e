"""EVA02-Large/14-448 (Pipeline A's feature extractor) as one export-friendly PyTorch module.

Reproduces timm's `Eva` as configured by `eva02_large_patch14_448` (the model behind the
checkpoint `eva02_large_patch14_448.mim_m38m_ft_in1k`, 305,080,232 parameters):
14×14 patch embedding, class token, learned absolute position embedding, 2-D rotary position
embedding on q/k of the patch tokens (timm `RotaryEmbeddingCat`, `in_pixels=False`, positions
scaled to the 16×16 pretraining grid), separate q/k/v projections (no k bias), SwiGLU MLP with a
LayerNorm inside (timm `SwiGLU`, `scale_mlp=True`), no layer scale, and an average-pooled head
(`global_pool="avg"`: mean over patch tokens → `fc_norm` → `head`; the final `norm` is Identity).

Module names equal timm's, so timm's state dict (its safetensors or .pth file) loads with
`strict=True`. Export-friendly: fused `scaled_dot_product_attention`, rotary sin/cos precomputed
for the static input size as non-persistent buffers (state dicts are unaffected), no
data-dependent control flow.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from iws_engine.export.weights import sha256_file

#: The timm checkpoint the IWS paper's Pipeline A used.
TIMM_MODEL_NAME = "eva02_large_patch14_448.mim_m38m_ft_in1k"
#: Parameters of that model: timm 1.0.31 `sum(p.numel())` on the meta device (timm's results CSV: 305.08 M).
TIMM_PARAM_COUNT = 305_080_232


@dataclass(frozen=True)
class Eva02Config:
    """Architecture hyper-parameters; the defaults are timm's `eva02_large_patch14_448`."""

    img_size: int = 448
    patch_size: int = 14
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4 * 2 / 3
    ref_feat_shape: tuple[int, int] = (16, 16)  # the 224/14 pretraining grid rotary positions are scaled to
    rope_temperature: float = 10000.0
    norm_eps: float = 1e-6  # timm.layers.LayerNorm's default

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"embed_dim {self.embed_dim} / num_heads {self.num_heads} must give a head dim divisible by 4 "
                "(2-D rotary embedding: two axes, sin/cos pairs)"
            )

    @classmethod
    def tiny(cls) -> "Eva02Config":
        """The same architecture at test size: 4×4 patch grid, 2 blocks, 4 heads of 16."""
        return cls(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)  # timm truncates: 1024 * 8/3 -> 2730


def rotary_sin_cos(config: Eva02Config) -> tuple[torch.Tensor, torch.Tensor]:
    """timm `RotaryEmbeddingCat(in_pixels=False, ref_feat_shape=...)` sin and cos, (num_patches, head_dim).

    Computed in float32 with timm's operation order, so the tables are bit-identical to timm's.
    Per token the channels are [row bands..., column bands...], each band repeated twice
    (the interleaved pairs that `rotate_pairs` rotates).
    """
    num_bands = config.head_dim // 4
    exponent = torch.arange(0, num_bands, 1, dtype=torch.int64).to(torch.float32) / num_bands
    bands = 1.0 / (config.rope_temperature**exponent)
    grid = config.grid_size
    coords = [
        torch.arange(grid, dtype=torch.int64).to(torch.float32) / grid * ref for ref in config.ref_feat_shape
    ]
    positions = torch.stack(torch.meshgrid(coords, indexing="ij"), dim=-1).unsqueeze(-1) * bands  # (H, W, 2, bands)
    sin = positions.sin().reshape(config.num_patches, -1).repeat_interleave(2, -1)
    cos = positions.cos().reshape(config.num_patches, -1).repeat_interleave(2, -1)
    return sin, cos


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...] (timm `rot`)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    """Precomputed float32 rotary tables for the class token plus the static patch grid.

    Row 0 (the class token) is the identity rotation (cos 1, sin 0), so the rotation applies to
    the whole sequence without slicing: x*1 + rot(x)*0 == x exactly, as timm leaves the token alone.
    """

    def __init__(self, config: Eva02Config):
        super().__init__()
        self.config = config
        sin, cos = self.tables(config)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("cos", cos, persistent=False)

    @staticmethod
    def tables(config: Eva02Config) -> tuple[torch.Tensor, torch.Tensor]:
        sin, cos = rotary_sin_cos(config)
        return torch.cat([torch.zeros(1, sin.shape[1]), sin]), torch.cat([torch.ones(1, cos.shape[1]), cos])

    def reset_tables(self) -> None:
        """Recompute the tables on the default device (after building on the meta device)."""
        self.sin, self.cos = self.tables(self.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate (B, heads, 1 + num_patches, head_dim) queries or keys.

        Computed in the tables' precision and cast back, as timm does (`.type_as(v)`).
        """
        return (x * self.cos + rotate_pairs(x) * self.sin).to(x.dtype)


class PatchEmbed(nn.Module):
    """timm `PatchEmbed`: a stride-`patch` convolution, flattened to (B, num_patches, dim)."""

    def __init__(self, config: Eva02Config):
        super().__init__()
        self.img_size = config.img_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, stride=config.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):  # static shapes: pos_embed and rope are fixed
            raise ValueError(f"expected N×C×{self.img_size}×{self.img_size} input, got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm `EvaAttention(qkv_fused=False)`: q and v projections with bias, k without."""

    def __init__(self, config: Eva02Config):
        super().__init__()
        dim, self.num_heads = config.embed_dim, config.num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.fused = True  # False: explicit softmax(q k^T / sqrt(d)) v, kept for tests and debugging

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, N, head_dim)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        q = rope(self.split_heads(self.q_proj(x)))
        k = rope(self.split_heads(self.k_proj(x)))
        v = self.split_heads(self.v_proj(x))
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """timm `SwiGLU` with its inner LayerNorm: fc2(norm(silu(fc1_g(x)) * fc1_x(x)))."""

    def __init__(self, config: Eva02Config):
        super().__init__()
        dim, hidden = config.embed_dim, config.mlp_hidden
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.norm_eps)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x)))


class Block(nn.Module):
    """Pre-norm transformer block without layer scale (timm `EvaBlock`, init_values=None)."""

    def __init__(self, config: Eva02Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class Eva02(nn.Module):
    """EVA02 classifier: N×3×img×img (CLIP-normalised) → N×num_classes logits."""

    def __init__(self, config: Eva02Config | None = None):
        super().__init__()
        self.config = config = config or Eva02Config()
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, config.embed_dim))
        self.rope = RotaryEmbedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.fc_norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.head = nn.Linear(config.embed_dim, config.num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, head_init_scale: float = 0.001) -> None:
        """timm's random initialisation (used only when no weights are loaded)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for layer_id, block in enumerate(self.blocks, start=1):  # timm fix_init_weight
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
        self.head.weight.mul_(head_init_scale)
        self.head.bias.mul_(head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token features after the last block, (B, 1 + num_patches, dim)."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x, self.rope)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x)
        pooled = tokens[:, 1:].mean(dim=1)  # global_pool="avg": patch tokens only
        return self.head(self.fc_norm(pooled))

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes: the 1,000 features Pipeline A's XGBoost stage reads."""
        return self.forward(x).softmax(dim=-1)


class Eva02Softmax(nn.Module):
    """Pipeline A's feature extractor: EVA02 → softmax over the 1,000 classes, in float32.

    The softmax runs in float32 whatever the network's precision (fp16/bf16 logits are upcast
    first), so reduced-precision backends differ from fp32 only through the network itself.
    """

    def __init__(self, model: Eva02):
        super().__init__()
        self.model = model

    @property
    def config(self) -> Eva02Config:
        return self.model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float().softmax(dim=-1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class LoadedEva02:
    """An eval-mode EVA02 and where its weights came from; `trained` is False for random weights."""

    model: Eva02
    trained: bool
    source: str  # the weights file, or "random-init(seed=...)"
    sha256: str = ""  # of the weights file

    @property
    def model_id(self) -> str:
        if not self.trained:
            return f"eva02-random-untrained:{self.source}"
        return f"{Path(self.source).stem}@{self.sha256[:12]}"


def random_eva02(config: Eva02Config | None = None, seed: int = 0) -> LoadedEva02:
    """A randomly initialised EVA02 (timm's init scheme); its outputs are meaningless and flagged so."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Eva02(config)
    return LoadedEva02(model=model.eval(), trained=False, source=f"random-init(seed={seed})")


#: Wrappers that training scripts put around a state dict (timm's checkpoint_filter_fn unwraps the same).
_STATE_DICT_WRAPPERS = ("model_ema", "model", "module", "state_dict")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a timm EVA02 checkpoint: `.safetensors`, or `.pth`/`.pt`/`.bin` (torch.load, weights only)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
    elif path.suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises pickle, zip and unpickler errors of many types
            raise ValueError(f"{path}: not a torch weights-only checkpoint ({type(e).__name__}: {e})") from None
        for key in _STATE_DICT_WRAPPERS:
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    else:
        raise ValueError(f"{path}: unknown weights format {path.suffix!r} (expected .safetensors, .pth, .pt or .bin)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: does not hold a flat name -> tensor state dict")
    # Rotary tables are recomputed, never loaded (timm's filter drops them too).
    return {k: v for k, v in state.items() if not k.startswith("rope.")}


def load_eva02_weights(path: str | os.PathLike[str], config: Eva02Config | None = None, *,
                       sha256: str | None = None) -> LoadedEva02:
    """An eval-mode float32 EVA02 with timm's weights for `config` (default: Large/14-448).

    The model is built on the meta device and the file's tensors are assigned to it, so the
    305 M parameters are held once and no random initialisation is spent. `sha256`: the file's,
    when the caller has already hashed it (1.2 GB is not read twice for it).
    """
    path = Path(path)
    config = config or Eva02Config()
    state = {k: v.to(torch.float32).contiguous() for k, v in read_state_dict(path).items()}
    with torch.device("meta"):
        model = Eva02(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(expected.keys() - got.keys())
        unexpected = sorted(got.keys() - expected.keys())
        wrong = sorted(f"{k}: {got[k]} != {expected[k]}" for k in expected.keys() & got.keys() if got[k] != expected[k])
        raise ValueError(
            f"{path}: tensors do not match EVA02 {_describe(expected)} (the file holds {_describe(got)}; "
            f"{len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(wrong)} of the wrong shape {wrong[:3]})"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.rope.reset_tables()  # non-persistent, so still on the meta device
    return LoadedEva02(model=model.eval(), trained=True, source=str(path), sha256=sha256 or sha256_file(path))


def _describe(shapes: dict[str, tuple[int, ...]]) -> str:
    """The architecture a state dict's shapes imply: embedding width, depth, tokens, classes."""
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    width = shapes.get("cls_token", (0, 0, "?"))[-1]
    tokens = shapes.get("pos_embed", (0, "?"))[1]
    classes = shapes.get("head.weight", ("?",))[0]
    return f"embed_dim {width}, depth {depth}, {tokens} tokens, {classes} classes"

