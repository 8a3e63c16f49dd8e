"""Model definitions (one file per family) and the factory that builds one from weights."""

from __future__ import annotations


def build_model(model):
    """An eval-mode torch module from `LoadedWeights` (or an already built module)."""
    import torch

    if isinstance(model, torch.nn.Module):
        return model.eval()
    from iws_engine.export.models import sarcnn

    if model.meta.model == "sarcnn":
        return sarcnn.from_weights(model)
    raise ValueError(f"unknown model architecture {model.meta.model!r}")
