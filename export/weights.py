"""Model weights as safetensors with a metadata record (the model's manifest).

Every weights file says what it is: the architecture, the preprocessing spec, the operating
threshold, where it came from (source file and sha256, timestamp, converter) and whether it
was trained at all. Readers refuse files without that record.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iws_engine.preprocess import PreprocessSpec

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class ModelMetadata:
    model: str  # architecture id, e.g. "sarcnn"
    model_name: str
    preprocess: PreprocessSpec
    threshold: float  # the model's declared operating threshold
    bn_epsilon: float = 1e-5
    source: str = ""
    source_sha256: str = ""
    source_timestamp: str = ""
    converter: str = ""
    cross_correlation: bool | None = None
    trained: bool = True
    extra: dict = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        """safetensors metadata must be str → str."""
        return {
            "iws_format": FORMAT_VERSION,
            "model": self.model,
            "model_name": self.model_name,
            "preprocess": self.preprocess.to_json(),
            "threshold": repr(float(self.threshold)),
            "bn_epsilon": repr(float(self.bn_epsilon)),
            "source": self.source,
            "source_sha256": self.source_sha256,
            "source_timestamp": self.source_timestamp,
            "converter": self.converter,
            "cross_correlation": json.dumps(self.cross_correlation),
            "trained": json.dumps(self.trained),
            "extra": json.dumps(self.extra, sort_keys=True, default=str),
        }

    @classmethod
    def from_strings(cls, d: dict[str, str], where: str = "") -> "ModelMetadata":
        if d.get("iws_format") != FORMAT_VERSION:
            raise ValueError(f"{where}: not an iws-engine weights file (metadata iws_format={d.get('iws_format')!r})")
        try:
            return cls(
                model=d["model"],
                model_name=d.get("model_name", d["model"]),
                preprocess=PreprocessSpec.from_json(d["preprocess"]),
                threshold=float(d["threshold"]),
                bn_epsilon=float(d.get("bn_epsilon", "1e-5")),
                source=d.get("source", ""),
                source_sha256=d.get("source_sha256", ""),
                source_timestamp=d.get("source_timestamp", ""),
                converter=d.get("converter", ""),
                cross_correlation=json.loads(d.get("cross_correlation", "null")),
                trained=json.loads(d.get("trained", "true")),
                extra=json.loads(d.get("extra", "{}")),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{where}: invalid iws-engine metadata ({e})") from None


@dataclass(frozen=True)
class LoadedWeights:
    tensors: dict[str, np.ndarray]
    meta: ModelMetadata
    sha256: str  # of the weights file: the model id used in outputs and caches
    path: Path | None

    @property
    def model_id(self) -> str:
        stem = self.path.stem if self.path else self.meta.model
        return f"{stem}@{self.sha256[:12]}"


def save(path: str | Path, tensors: dict[str, np.ndarray], meta: ModelMetadata) -> None:
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=meta.to_strings())


def load(path: str | Path) -> LoadedWeights:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read weights ({e.strerror})") from None
    try:
        tensors = load(data)  # validates the whole file, header included
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    # The metadata comes from the same bytes as the tensors and the sha256 (one read, one version).
    (header_len,) = struct.unpack("<Q", data[:8])
    raw_meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    meta = ModelMetadata.from_strings(raw_meta, where=str(path))
    return LoadedWeights(tensors=tensors, meta=meta, sha256=hashlib.sha256(data).hexdigest(), path=path)


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 16 MiB chunks (EVA02 weights are 1.2 GB): the identity used in model ids,
    manifests and caches."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_weights_path() -> Path:
    """The embedded default SAR_CNN weights shipped inside the package."""
    from importlib.resources import files

    return Path(str(files("iws_engine.data").joinpath("sarcnn_synthetic.safetensors")))
