"""Model definitions (one file per family) and the factory that builds one from weights."""

from __future__ import annotations


def build_model(model):
    """An eval-mode torch module from loaded weights (or an already built module).

    SAR_CNN weights (`LoadedWeights`) give SarCNN (one logit per image); EVA02 weights
    (`LoadedEva02`) give Pipeline A's feature extractor (1,000 softmax features per image). Each
    call returns a module of its own: backends move and cast it (inductor converts it to fp16 in
    place), which must not change the weights another backend, or the parity reference, runs.
    """
    import torch

    if isinstance(model, torch.nn.Module):
        return model.eval()
    from iws_engine.export.models import eva02, sarcnn

    if isinstance(model, eva02.LoadedEva02):
        import copy

        return eva02.Eva02Softmax(copy.deepcopy(model.model)).eval()
    if model.meta.model == "sarcnn":
        return sarcnn.from_weights(model)
    raise ValueError(f"unknown model architecture {model.meta.model!r}")


def is_eva02(model) -> bool:
    """Whether `model` is EVA02 (weights or module): its ONNX export takes the dynamo path."""
    from iws_engine.export.models import eva02

    return isinstance(model, (eva02.LoadedEva02, eva02.Eva02, eva02.Eva02Softmax))
