"""Import the IWS SAR_CNN v2 Lux.jl checkpoint (JLD2) into PyTorch weights.

JLD2 files are HDF5 files written by Julia:
- arrays are column-major, so h5py sees every array with its dimensions reversed;
- NamedTuples (`ps`, `st`, `model`) are compound datasets whose fields are object references;
- every committed datatype carries a `julia_type` attribute naming the Julia type; structs list
  `field_names` and `field_types`, and singleton fields such as Lux's `cross_correlation`
  (a `Static.True`/`Static.False`) exist only as the *type* of that field.
The converter reads the architecture from the checkpoint itself and refuses a checkpoint that
is not SAR_CNN v2, saying what differs.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iws_engine.export.weights import sha256_file

CONVERTER_VERSION = "1.0.0"


class CheckpointError(ValueError):
    """The checkpoint cannot be read or is not the architecture this engine implements."""


@dataclass(frozen=True)
class LuxConv:
    in_chs: int
    out_chs: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int
    cross_correlation: bool
    activation: str


@dataclass(frozen=True)
class LuxBlock:
    conv: LuxConv
    bn_epsilon: float
    bn_activation: str
    pool: tuple[int, int] | None  # max-pool window (= stride), or None for NoOpLayer
    dropout: float


@dataclass(frozen=True)
class LuxCheckpoint:
    """What the converter read from the JLD2: architecture, tensors (PyTorch layout) and metadata."""

    blocks: tuple[LuxBlock, ...]
    dense: tuple[tuple[int, int, str], ...]  # (in, out, activation) per Dense layer
    head_dropout: float
    tensors: dict[str, np.ndarray]
    norm_mean: float
    norm_std: float
    timestamp: str
    training: dict[str, object]


def julia_type_name(obj) -> str:
    """The `julia_type` attribute's type name (e.g. "Lux.Conv") of an HDF5 object or datatype.

    h5py cannot convert JLD2's `julia_type` attribute (a compound of a variable-length string and
    a vlen of references), so the attribute is read in its own file type and the string pointer
    that HDF5 allocated is read directly.
    """
    import h5py

    attr = h5py.h5a.open(obj.id, b"julia_type")
    ftype = attr.get_type()
    if ftype.get_class() != h5py.h5t.COMPOUND or ftype.get_member_name(0) != b"name":
        raise CheckpointError("unexpected julia_type attribute layout (not a JLD2 file?)")
    member = ftype.get_member_type(0)
    if not (isinstance(member, h5py.h5t.TypeStringID) and member.is_variable_str()):
        raise CheckpointError("unexpected julia_type name encoding (not a JLD2 file?)")
    buf = np.zeros(ftype.get_size(), dtype=np.uint8)
    attr.read(buf, mtype=ftype)
    pointer = int.from_bytes(buf[ftype.get_member_offset(0) : ftype.get_member_offset(0) + 8].tobytes(), "little")
    if pointer == 0:
        raise CheckpointError("empty julia_type name")
    return ctypes.string_at(pointer).decode("utf-8")


def stored_type(dataset):
    """The committed datatype (with its JLD2 attributes) of a dataset written by JLD2."""
    import h5py

    tid = dataset.id.get_type()
    if not tid.committed():
        raise CheckpointError(f"{dataset.name}: datatype is not a committed JLD2 type")
    return h5py.Datatype(tid)


class _Reader:
    def __init__(self, f):
        self.f = f

    def deref(self, ref):
        if not ref:
            raise CheckpointError("null object reference in checkpoint")
        return self.f[ref]

    def struct_field_types(self, dataset) -> dict[str, str]:
        """Julia type name of every field of the struct stored in `dataset` (from its datatype)."""
        attrs = stored_type(dataset).attrs
        if "field_names" not in attrs:
            return {}
        out = {}
        for name, ref in zip(attrs["field_names"], attrs["field_types"]):
            name = name.decode() if isinstance(name, bytes) else str(name)
            out[name] = julia_type_name(self.f[ref]) if ref else "inline"
        return out

    def type_of(self, dataset) -> str:
        return julia_type_name(stored_type(dataset))

    def array(self, ref) -> np.ndarray:
        ds = self.deref(ref)
        return np.asarray(ds[()])


def _tuple(v) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


def _read_conv(r: _Reader, ds) -> LuxConv:
    jtype = r.type_of(ds)
    if jtype != "Lux.Conv":
        raise CheckpointError(f"expected a Lux.Conv layer, found {jtype}")
    ftypes = r.struct_field_types(ds)
    cc = ftypes.get("cross_correlation")
    if cc not in ("Static.True", "Static.False"):
        raise CheckpointError(f"cannot read Lux Conv cross_correlation flag (type {cc!r})")
    v = ds[()]
    names = ds.dtype.names
    get = dict(zip(names, v))
    return LuxConv(
        in_chs=int(get["in_chs"]),
        out_chs=int(get["out_chs"]),
        kernel=_tuple(get["kernel_size"]),
        stride=_tuple(get["stride"]),
        pad=_tuple(get["pad"]),
        dilation=_tuple(get["dilation"]),
        groups=int(get["groups"]),
        cross_correlation=(cc == "Static.True"),
        activation=ftypes.get("activation", "?"),
    )


def _read_pool(r: _Reader, ds) -> tuple[int, int] | None:
    jtype = r.type_of(ds)
    if jtype == "Lux.NoOpLayer":
        return None
    if jtype != "Lux.MaxPool":
        raise CheckpointError(f"expected Lux.MaxPool or NoOpLayer, found {jtype}")
    ((mode,),) = ds[()]
    kernel, stride, pad, dilation = (_tuple(x) for x in mode)
    if kernel != stride or any(pad) or dilation != (1, 1):
        raise CheckpointError(f"unsupported MaxPool kernel={kernel} stride={stride} pad={pad} dilation={dilation}")
    return kernel


def _read_dropout(r: _Reader, ds) -> float:
    jtype = r.type_of(ds)
    if jtype != "Lux.Dropout":
        raise CheckpointError(f"expected Lux.Dropout, found {jtype}")
    return float(dict(zip(ds.dtype.names, ds[()]))["p"])


def read_checkpoint(path: str | Path) -> LuxCheckpoint:
    """Read architecture, parameters, BatchNorm statistics and metadata from a Lux JLD2."""
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable JLD2/HDF5 file ({e})") from None
    with f:
        missing = [k for k in ("ps", "st", "model", "norm_mean", "norm_std") if k not in f]
        if missing:
            raise CheckpointError(f"{path}: missing keys {missing} (expected a Lux training checkpoint)")
        r = _Reader(f)
        model_ds = f["model"]
        model_type = julia_type_name(stored_type(model_ds))
        model = model_ds[()]
        block_names = model_ds.dtype.names
        blocks: list[LuxBlock] = []
        dense: list[tuple[int, int, str]] = []
        head_dropout = 0.0
        for i, bname in enumerate(block_names):
            fields = model_ds.dtype[i].names
            parts = {fname: r.deref(model[i][j]) for j, fname in enumerate(fields)}
            if set(fields) == {"conv", "bn", "pool", "drop"}:
                conv = _read_conv(r, parts["conv"])
                bn = parts["bn"]
                if r.type_of(bn) != "Lux.BatchNorm":
                    raise CheckpointError(f"{bname}.bn is {r.type_of(bn)}, expected Lux.BatchNorm")
                bn_vals = dict(zip(bn.dtype.names, bn[()]))
                if int(bn_vals["chs"]) != conv.out_chs:
                    raise CheckpointError(f"{bname}: BatchNorm has {bn_vals['chs']} channels, conv has {conv.out_chs}")
                blocks.append(
                    LuxBlock(
                        conv=conv,
                        bn_epsilon=float(bn_vals["epsilon"]),
                        bn_activation=r.struct_field_types(bn).get("activation", "?"),
                        pool=_read_pool(r, parts["pool"]),
                        dropout=_read_dropout(r, parts["drop"]),
                    )
                )
            elif set(fields) == {"dense1", "dropout", "dense2"}:
                for name in ("dense1", "dense2"):
                    ds = parts[name]
                    if r.type_of(ds) != "Lux.Dense":
                        raise CheckpointError(f"{bname}.{name} is {r.type_of(ds)}, expected Lux.Dense")
                    vals = dict(zip(ds.dtype.names, ds[()]))
                    dense.append((int(vals["in_dims"]), int(vals["out_dims"]), r.struct_field_types(ds)["activation"]))
                head_dropout = _read_dropout(r, parts["dropout"])
            else:
                raise CheckpointError(f"{path}: unknown block {bname!r} with fields {fields} in {model_type}")

        tensors = _read_tensors(r, f, blocks)
        training = {}
        for key in ("epochs", "batch_size", "learning_rate", "max_lr", "weight_decay", "label_smooth", "best_val_loss", "tta_val_acc", "backend"):
            if key in f:
                v = f[key][()]
                training[key] = v.decode() if isinstance(v, bytes) else v.item()
        ts = f["timestamp"][()] if "timestamp" in f else b""
        return LuxCheckpoint(
            blocks=tuple(blocks),
            dense=tuple(dense),
            head_dropout=head_dropout,
            tensors=tensors,
            norm_mean=float(np.float32(f["norm_mean"][()])),
            norm_std=float(np.float32(f["norm_std"][()])),
            timestamp=ts.decode() if isinstance(ts, bytes) else str(ts),
            training=training,
        )


def _named(r: _Reader, ds, path: tuple[str, ...]):
    """Follow a path of field names through nested compound datasets to an object reference."""
    value = ds[()]
    dtype = ds.dtype
    for name in path:
        if dtype.names is None or name not in dtype.names:
            raise CheckpointError(f"checkpoint has no field {'.'.join(path)} under {ds.name}")
        idx = dtype.names.index(name)
        value, dtype = value[idx], dtype[idx]
    return value


def conv_weight_to_torch(julia_reversed: np.ndarray, cross_correlation: bool) -> np.ndarray:
    """Lux conv kernel as h5py reads it, (out, in, k2, k1), → torch (out, in, kH, kW).

    Julia's kernel is w[k1, k2, in, out] with k1 along the image rows (torch H); h5py reverses it.
    Lux with cross_correlation=false computes a true convolution (NNlib flips the kernel in both
    spatial dimensions); torch's conv2d is a cross-correlation, so the kernel is flipped here.
    """
    w = julia_reversed.transpose(0, 1, 3, 2)
    if not cross_correlation:
        w = w[:, :, ::-1, ::-1]
    return np.ascontiguousarray(w, dtype=np.float32)


def _read_tensors(r: _Reader, f, blocks: list[LuxBlock]) -> dict[str, np.ndarray]:
    ps, st = f["ps"], f["st"]
    out: dict[str, np.ndarray] = {}
    for i, block in enumerate(blocks, start=1):
        b = f"block{i}"
        w = r.array(_named(r, ps, (b, "conv", "weight")))
        expected = (block.conv.out_chs, block.conv.in_chs // block.conv.groups, *reversed(block.conv.kernel))
        if w.shape != expected:
            raise CheckpointError(f"{b}.conv.weight has shape {w.shape} (h5py order), expected {expected}")
        out[f"{b}.conv.weight"] = conv_weight_to_torch(w, block.conv.cross_correlation)
        out[f"{b}.conv.bias"] = r.array(_named(r, ps, (b, "conv", "bias"))).astype(np.float32).reshape(-1)
        out[f"{b}.bn.weight"] = r.array(_named(r, ps, (b, "bn", "scale"))).astype(np.float32).reshape(-1)
        out[f"{b}.bn.bias"] = r.array(_named(r, ps, (b, "bn", "bias"))).astype(np.float32).reshape(-1)
        out[f"{b}.bn.running_mean"] = r.array(_named(r, st, (b, "bn", "running_mean"))).astype(np.float32).reshape(-1)
        out[f"{b}.bn.running_var"] = r.array(_named(r, st, (b, "bn", "running_var"))).astype(np.float32).reshape(-1)
    for name in ("dense1", "dense2"):
        # Lux Dense weight is (out, in) in Julia, so h5py shows (in, out).
        w = r.array(_named(r, ps, ("classifier", name, "weight")))
        out[f"{name}.weight"] = np.ascontiguousarray(w.T, dtype=np.float32)
        out[f"{name}.bias"] = r.array(_named(r, ps, ("classifier", name, "bias"))).astype(np.float32).reshape(-1)
    return out


def check_sarcnn_v2(ckpt: LuxCheckpoint) -> None:
    """Refuse anything that is not SAR_CNN v2, naming every difference."""
    from iws_engine.export.models.sarcnn import HEAD_DROPOUT, SARCNN_V2_BLOCKS, SARCNN_V2_HEAD

    problems: list[str] = []
    if len(ckpt.blocks) != len(SARCNN_V2_BLOCKS):
        problems.append(f"{len(ckpt.blocks)} conv blocks, SAR_CNN v2 has {len(SARCNN_V2_BLOCKS)}")
    for i, (got, want) in enumerate(zip(ckpt.blocks, SARCNN_V2_BLOCKS), start=1):
        c = got.conv
        checks = {
            "in_chs": (c.in_chs, want.in_ch),
            "out_chs": (c.out_chs, want.out_ch),
            "kernel_size": (c.kernel, (want.kernel, want.kernel)),
            "stride": (c.stride, (want.stride, want.stride)),
            "pad": (c.pad, (want.pad,) * 4),
            "dilation": (c.dilation, (1, 1)),
            "groups": (c.groups, 1),
            "max-pool": (got.pool, (2, 2) if want.pool else None),
            "conv activation": (c.activation, "Base.#identity"),
            "BatchNorm activation": (got.bn_activation, "Base.#identity"),
        }
        for what, (g, w) in checks.items():
            if g != w:
                problems.append(f"block{i} {what} is {g}, SAR_CNN v2 has {w}")
    d_in, d_hidden, d_out = SARCNN_V2_HEAD
    want_dense = ((d_in, d_hidden, "NNlib.#relu"), (d_hidden, d_out, "Base.#identity"))
    if ckpt.dense != want_dense:
        problems.append(f"classifier Dense layers are {ckpt.dense}, SAR_CNN v2 has {want_dense}")
    if abs(ckpt.head_dropout - HEAD_DROPOUT) > 1e-6:
        problems.append(f"classifier dropout is {ckpt.head_dropout}, SAR_CNN v2 has {HEAD_DROPOUT}")
    eps = {b.bn_epsilon for b in ckpt.blocks}
    if len(eps) > 1:
        problems.append(f"BatchNorm epsilon differs between blocks: {sorted(eps)}")
    if problems:
        raise CheckpointError("checkpoint is not SAR_CNN v2: " + "; ".join(problems))


def import_lux(checkpoint: str | Path, output: str | Path, *, threshold: float = 0.47) -> dict[str, str]:
    """Convert a Lux SAR_CNN v2 checkpoint to safetensors with metadata; returns the metadata."""
    from iws_engine.export import weights
    from iws_engine.preprocess import iws_sarcnn_spec

    ckpt = read_checkpoint(checkpoint)
    check_sarcnn_v2(ckpt)
    eps = ckpt.blocks[0].bn_epsilon
    meta = weights.ModelMetadata(
        model="sarcnn",
        model_name="SAR_CNN v2 (IWS, Pinelo et al. GMD 2026)",
        preprocess=iws_sarcnn_spec(ckpt.norm_mean, ckpt.norm_std),
        threshold=threshold,
        bn_epsilon=eps,
        source=str(Path(checkpoint).name),
        source_sha256=sha256_file(checkpoint),
        source_timestamp=ckpt.timestamp,
        converter=f"iws_engine.export.lux {CONVERTER_VERSION}",
        cross_correlation=ckpt.blocks[0].conv.cross_correlation,
        trained=True,
        extra={"training": ckpt.training},
    )
    weights.save(output, ckpt.tensors, meta)
    return meta.to_strings()
