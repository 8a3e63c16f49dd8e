"""Gated artefacts built on first use: the fast CPU precisions in `classify` (and `bench`) without --artifacts.

The reduced precisions on the CPU — INT8 on ONNX Runtime or OpenVINO (a calibrated QDQ graph) and inductor's
bf16/fp16 — run only once they passed the parity gate on the model at hand. Without --artifacts
the artefact is built by `export.build.build` — the same export, calibration (INT8: the target's
probe vignettes; for real calibration images run `iws-engine build --calib DIR` and pass
--artifacts) and parity gate (inductor: a manifest only, the network compiles at load) —
into a cache folder named after the model's sha256, backend, precision and device, and reused
while its manifest fits (build's own cache check). A build the gate refused is remembered in that
folder (manifest.failed.json), so later calls are refused at once with the same figures instead of
quantizing again; deleting the folder retries. A file lock serialises processes building the same
artefact.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: where the cache lives instead of ~/.cache/iws-engine (tests point it at a temporary folder)
CACHE_ENV = "IWS_ENGINE_CACHE"
FAILED_MANIFEST = "manifest.failed.json"


def needs_artefact(backend: str, precision: str, device: str = "cpu") -> bool:
    """Whether (backend, precision, device) runs only from a built, parity-gated artefact."""
    from iws_engine.export.build import INT8_QDQ_BACKENDS

    if backend in INT8_QDQ_BACKENDS and precision == "int8":
        return True
    return backend == "inductor" and precision in ("bf16", "fp16") and not str(device).startswith("cuda")


def cache_root() -> Path:
    """$IWS_ENGINE_CACHE, else $XDG_CACHE_HOME/iws-engine, else ~/.cache/iws-engine."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "iws-engine"


def cached_artifacts(target, backend: str, precision: str, device: str = "cpu") -> Path:
    """The folder of the parity-gated artefact for (`target`, backend, precision, device), built now
    when it is missing or does not fit; raises BuildError (with the gate's figures) when the gate
    refuses it, now or in an earlier call."""
    from iws_engine.export.build import build, environment, gate, mismatch

    name = f"{target.model}-{target.sha256[:16]}-{backend}-{precision}-{device.replace(':', '')}"
    out = cache_root() / "artifacts" / name
    with _locked(out.with_name(name + ".lock")):
        failed = out / FAILED_MANIFEST
        if failed.is_file() and not (out / "manifest.json").is_file():
            record = json.loads(failed.read_text())
            if (target.same_model(record) and record.get("backend") == backend
                    and record.get("precision") == precision and not mismatch(record, environment(device))):
                parity = {k: v for k, v in record["parity"].items() if k != "passed"}
                try:
                    gate(parity, precision)  # raises with the recorded figures
                except Exception as e:
                    raise type(e)(f"{e} (measured {record.get('built_at')}; delete {out} to build again)") from None
        try:
            build(target=target, backend=backend, precision=precision, device=device, out_dir=out)
        except Exception:
            (out / "manifest.json").unlink(missing_ok=True)  # a refused rebuild must not leave a stale manifest
            raise
        failed.unlink(missing_ok=True)
    return out


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
