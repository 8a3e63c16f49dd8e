"""Train SAR_CNN v2 as the paper did: AdamW, one-cycle schedule, label smoothing 0.1, rotation augmentation.

Used to make the embedded default model from synthetic vignettes, so the engine works on a
fresh clone without the IWS checkpoint. The inputs go through exactly the engine's loader and
preprocessing (the Julia-faithful reference), so what the model is trained on is what it sees.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from iws_engine.preprocess import PreprocessSpec


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 14
    batch_size: int = 16
    max_lr: float = 3e-3
    weight_decay: float = 1e-2
    label_smoothing: float = 0.1
    seed: int = 0
    n_train: int = 3000
    n_val: int = 300
    threads: int | None = None
    train_seed_offset: int = 1_000  # synthetic train/val/test sets never share a seed
    val_seed_offset: int = 2_000


def load_labelled(folder: Path, spec: PreprocessSpec, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All PNGs listed in folder/labels.csv, preprocessed (N, 1, H, W) float32, with labels (N,)."""
    import csv

    from iws_engine.loaders.cpu import CpuLoader

    with open(folder / "labels.csv", newline="") as f:
        rows = [(r["id"], int(r["ground_truth"])) for r in csv.DictReader(f)]
    paths = [folder / f"{rid}.png" for rid, _ in rows]
    xs, ys = [], []
    loader = CpuLoader(spec, batch_size=64, workers=workers)
    for batch in loader.batches(paths):
        if batch.errors:
            raise ValueError("cannot train on unreadable images: " + "; ".join(batch.errors.values()))
        xs.append(batch.inputs)
    ys = np.array([label for _, label in rows], dtype=np.float32)
    return np.concatenate(xs), ys


def _augment(x, generator):
    """Random 90° rotations and flips per batch: SAR wave packets have no preferred orientation."""
    import torch

    k = int(torch.randint(0, 4, (1,), generator=generator))
    x = torch.rot90(x, k, dims=(2, 3))
    if bool(torch.randint(0, 2, (1,), generator=generator)):
        x = torch.flip(x, dims=(3,))
    return x


def fit(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, cfg: TrainConfig, log=print):
    """Train from normalised inputs; returns (best model, history) — best by validation AUC."""
    import torch

    from iws_engine.backends.base import cpu_cores
    from iws_engine.bench.metrics import roc_auc
    from iws_engine.export.models.sarcnn import SarCNN

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or cpu_cores())
    gen = torch.Generator().manual_seed(cfg.seed)
    model = SarCNN().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.max_lr / 25, weight_decay=cfg.weight_decay)
    steps_per_epoch = int(np.ceil(len(x_train) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.max_lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    xv = torch.from_numpy(x_val)
    history, best = [], (-1.0, None)
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            xb = _augment(xt[idx], gen).contiguous(memory_format=torch.channels_last)
            target = yt[idx] * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
            loss = loss_fn(model(xb)[:, 0], target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.inference_mode():
            logits = torch.cat([model(xv[i:i + 128].contiguous(memory_format=torch.channels_last))[:, 0]
                                for i in range(0, len(xv), 128)]).numpy()
        auc = roc_auc(y_val, logits)
        acc = float(((logits >= 0) == (y_val > 0.5)).mean())
        history.append({"epoch": epoch + 1, "train_loss": total / len(xt), "val_auc": auc, "val_acc_0.5": acc,
                        "seconds": time.perf_counter() - t0})
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {total / len(xt):.4f}  val AUC {auc:.4f}  "
            f"val acc {acc:.4f}  ({time.perf_counter() - t0:.0f} s)")
        if auc > best[0]:
            best = (auc, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    return model.eval().to(memory_format=torch.contiguous_format), history


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The paper's choice of operating threshold: best F1 over the 0.30–0.70 sweep."""
    from iws_engine.bench.metrics import f1_optimal_threshold as best, threshold_sweep

    return float(best(threshold_sweep(labels, scores)))


def train_main(cfg: TrainConfig, *, output: Path, data: Path | None = None, val_data: Path | None = None,
               record: Path | None = None, command: str = "iws_engine.export.train.train_main") -> int:
    import torch

    from iws_engine.backends.base import sigmoid
    from iws_engine.export import weights
    from iws_engine.export.models.sarcnn import state_to_numpy
    from iws_engine.export.synth import generate
    from iws_engine.preprocess import iws_sarcnn_spec

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    started = time.time()
    sources = {
        "train": str(data) if data else f"synthetic: iws_engine.export.synth.generate(n={cfg.n_train}, seed={cfg.seed + cfg.train_seed_offset}, rgba16 539x528)",
        "val": str(val_data) if val_data else f"synthetic: iws_engine.export.synth.generate(n={cfg.n_val}, seed={cfg.seed + cfg.val_seed_offset}, rgba16 539x528)",
    }
    with tempfile.TemporaryDirectory(prefix="iws-train-") as tmp:
        if data is None:
            data = Path(tmp) / "train"
            log(f"synthesising {cfg.n_train} training vignettes (seed {cfg.seed + cfg.train_seed_offset})")
            generate(data, cfg.n_train, seed=cfg.seed + cfg.train_seed_offset)
        if val_data is None:
            val_data = Path(tmp) / "val"
            log(f"synthesising {cfg.n_val} validation vignettes (seed {cfg.seed + cfg.val_seed_offset})")
            generate(val_data, cfg.n_val, seed=cfg.seed + cfg.val_seed_offset)
        # Normalisation statistics come from the training set, as in the paper.
        raw = PreprocessSpec(mean=0.0, std=1.0)
        log("decoding and preprocessing")
        x_train, y_train = load_labelled(data, raw)
        x_val, y_val = load_labelled(val_data, raw)
    mean, std = float(np.float32(x_train.mean(dtype=np.float64))), float(np.float32(x_train.std(dtype=np.float64)))
    spec = iws_sarcnn_spec(mean, std)
    for x in (x_train, x_val):
        x -= np.float32(mean)
        x /= np.float32(std)
    log(f"training on {len(x_train)} images ({int(y_train.sum())} positive), mean {mean:.4f} std {std:.4f}")
    model, history = fit(x_train, y_train, x_val, y_val, cfg, log=log)
    with torch.inference_mode():
        val_scores = sigmoid(torch.cat([model(torch.from_numpy(x_val[i:i + 128]))[:, 0]
                                        for i in range(0, len(x_val), 128)]).numpy())
    threshold = f1_optimal_threshold(y_val, val_scores)
    info = {
        "command": command,
        "config": asdict(cfg),
        "data": {**sources, "n_train": int(len(y_train)), "n_val": int(len(y_val))},
        "history": history,
        "val_auc": history[-1]["val_auc"] if history else None,
        "best_val_auc": max(h["val_auc"] for h in history),
        "threshold": threshold,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "seconds": round(time.time() - started, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    meta = weights.ModelMetadata(
        model="sarcnn",
        model_name="SAR_CNN v2 trained on iws-engine synthetic vignettes (demo default, not the IWS model)",
        preprocess=spec,
        threshold=threshold,
        source="synthetic",
        converter="iws_engine.export.train",
        trained=True,
        extra={"training": info},
    )
    weights.save(output, state_to_numpy(model), meta)
    if record is not None:
        Path(record).write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {output}: best val AUC {info['best_val_auc']:.4f}, threshold {threshold:.2f}")
    return 0
