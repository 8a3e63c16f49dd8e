"""SAR_CNN v2 (Pinelo et al., GMD 2026, Table 1) in PyTorch.

Four Conv→BatchNorm→ReLU→(MaxPool 2×2)→Dropout blocks, global average pooling, and a
Dense 128→64 (ReLU) → Dropout → Dense 64→1 head; 283,329 trainable parameters. The forward
returns the logit; `probability` applies the sigmoid. In eval mode it has Lux test-mode
semantics: BatchNorm uses running statistics and dropout is off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Trainable parameters per layer of the paper's Table 1 (conv+BN per block, pool, dense1, dense2).
TABLE1_PARAMS = (1_664, 51_392, 74_112, 147_840, 0, 8_256, 65)
TOTAL_PARAMS = 283_329


@dataclass(frozen=True)
class ConvSpec:
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    pad: int
    pool: bool
    dropout: float


#: The architecture read from the IWS checkpoint's `model` struct (see export/lux.py).
SARCNN_V2_BLOCKS = (
    ConvSpec(1, 32, 7, 2, 3, False, 0.05),
    ConvSpec(32, 64, 5, 1, 2, True, 0.10),
    ConvSpec(64, 128, 3, 1, 1, True, 0.15),
    ConvSpec(128, 128, 3, 1, 1, True, 0.20),
)
SARCNN_V2_HEAD = (128, 64, 1)
HEAD_DROPOUT = 0.4
BN_EPS = 1e-5
INPUT_SHAPE = (1, 256, 256)


class ConvBlock(nn.Module):
    def __init__(self, spec: ConvSpec, eps: float = BN_EPS):
        super().__init__()
        self.conv = nn.Conv2d(spec.in_ch, spec.out_ch, spec.kernel, spec.stride, spec.pad)
        # Lux BatchNorm momentum 0.1 weighs the new batch by 0.1, as torch does.
        self.bn = nn.BatchNorm2d(spec.out_ch, eps=eps, momentum=0.1)
        self.pool = nn.MaxPool2d(2) if spec.pool else nn.Identity()
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.pool(torch.relu(self.bn(self.conv(x)))))


class SarCNN(nn.Module):
    """SAR_CNN v2: input N×1×256×256 float32 (normalised), output N×1 logits."""

    def __init__(self, eps: float = BN_EPS):
        super().__init__()
        self.block1, self.block2, self.block3, self.block4 = (ConvBlock(s, eps) for s in SARCNN_V2_BLOCKS)
        d_in, d_hidden, d_out = SARCNN_V2_HEAD
        self.dense1 = nn.Linear(d_in, d_hidden)
        self.dropout = nn.Dropout(HEAD_DROPOUT)
        self.dense2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(x))))
        x = x.mean(dim=(2, 3))  # global average pool
        return self.dense2(self.dropout(torch.relu(self.dense1(x))))

    @torch.no_grad()
    def probability(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(x))


def count_params_per_layer(model: SarCNN) -> tuple[int, ...]:
    """Trainable parameters grouped as in the paper's Table 1."""

    def n(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    blocks = [n(b) for b in (model.block1, model.block2, model.block3, model.block4)]
    return (*blocks, 0, n(model.dense1), n(model.dense2))


def from_weights(loaded) -> SarCNN:
    """Build an eval-mode SarCNN from `iws_engine.export.weights.LoadedWeights`."""
    if loaded.meta.model != "sarcnn":
        raise ValueError(f"{loaded.path}: weights are for model {loaded.meta.model!r}, not 'sarcnn'")
    model = SarCNN(eps=loaded.meta.bn_epsilon)
    state = {k: torch.from_numpy(v.copy()) for k, v in loaded.tensors.items()}
    expected = set(model.state_dict())
    got = set(state) | {k for k in expected if k.endswith("num_batches_tracked")}
    if got != expected:
        raise ValueError(
            f"{loaded.path}: tensors do not match SAR_CNN v2 "
            f"(missing {sorted(expected - got)}, unexpected {sorted(got - expected)})"
        )
    model.load_state_dict(state, strict=False)
    return model.eval()


def state_to_numpy(model: SarCNN) -> dict:
    """Trainable weights and BatchNorm statistics as float32 NumPy arrays (no step counters)."""
    return {
        k: v.detach().cpu().numpy().astype("float32")
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
