"""timm as the reference implementation in tests: imported honestly on the CPU machines, where PyPI's
torchvision (a CUDA build) cannot load its compiled operators. See `import_timm`."""

from __future__ import annotations

import pytest
import torch

# The operators torchvision's Python code registers fake (meta) kernels for, unconditionally, at import time
# (torchvision/_meta_registrations.py, 0.28: @torch.library.register_fake("torchvision::nms"/"::qnms")). Every
# other registration there and in _autograd_registrations.py is guarded by torchvision.extension._has_ops().
# Schemas exactly as torchvision's C++ defines them (csrc/ops/nms.cpp, csrc/ops/quantized/cpu/qnms_kernel.cpp).
TORCHVISION_IMPORT_TIME_OPS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def torchvision_extension_error() -> str | None:
    """Why torchvision's C++ extension (torchvision/_C) does not load into this torch, or None when it loads or
    torchvision is not installed: located and loaded the way torchvision.extension does it."""
    import importlib.machinery
    import importlib.util
    import os

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = spec.submodule_search_locations[0]
    loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    ext = importlib.machinery.FileFinder(lib_dir, loader).find_spec("_C")
    if ext is None:
        return f"no _C extension in {lib_dir}"
    try:
        torch.ops.load_library(ext.origin)
    except (ImportError, OSError) as e:
        cause = e.__cause__ or e
        return f"{os.path.basename(ext.origin)}: {str(cause).strip().splitlines()[0][:200]}"
    return None


TORCHVISION_OPS_DECLARED: list[str] = []  # what import_timm declared in this process (empty where torchvision is whole)


def import_torchvision_without_its_extension() -> None:
    """import torchvision; where it fails only because its C++ extension did not load, declare the operator
    schemas its Python code needs at import time and import it again. Any other failure propagates."""
    import importlib
    import sys

    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as e:
        extension = sys.modules.get("torchvision.extension")  # imported (and _C tried) before the failure
        unloaded = extension is not None and not extension._has_ops()
        missing_op = any(f"operator {name} does not exist" in str(e) for name in TORCHVISION_IMPORT_TIME_OPS)
        if not (unloaded and missing_op):
            raise
    for name, schema in TORCHVISION_IMPORT_TIME_OPS.items():
        namespace, op = name.split("::")
        if not hasattr(getattr(torch.ops, namespace), op):
            torch.library.define(name, schema)  # a schema only, no kernel (kept alive by torch.library)
            TORCHVISION_OPS_DECLARED.append(name)
    importlib.import_module("torchvision")  # re-runs the package __init__ that failed; nothing else is patched


def import_timm():
    """timm, imported honestly; a skip naming the exact reason where that is impossible.

    timm 1.0.x imports torchvision at import time (timm.layers uses torchvision.ops.misc.FrozenBatchNorm2d,
    timm.data its transforms). On the CPU machines the only torchvision matching torch 2.13.0 is PyPI's CUDA
    build, whose C++ extension links libtorch_cuda.so / libc10_cuda.so, which the CPU torch wheel does not have.
    torchvision is written to import without its extension (torchvision.extension._has_ops() is then False and
    every registration for the compiled operators is skipped) except that torchvision/_meta_registrations.py
    registers fake kernels for torchvision::nms and torchvision::qnms unconditionally, which raises "operator
    torchvision::nms does not exist".

    So, only when `import torchvision` fails with exactly that and torchvision itself reports that its extension
    did not load, those two operator *schemas* (TORCHVISION_IMPORT_TIME_OPS: names and signatures, no kernel)
    are declared and torchvision is imported again. Nothing else is changed: torchvision's and timm's own Python
    code runs unmodified. Calling torchvision::nms/qnms then raises NotImplementedError (no kernel) and every
    other torchvision operator does not exist at all, so no code that needs torchvision's compiled operators can
    produce a number here; the parity test also records every operator timm's Eva forward dispatches and asserts
    that none is torchvision's. The code under test is timm's Eva model (timm/models/eva.py and the timm.layers
    it uses), which does not use torchvision. Where torchvision imports normally (the H100 machine), nothing is
    declared.
    """
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (bash .ci/setup installs the pinned timm and torchvision, --no-deps)")
    try:
        if importlib.util.find_spec("torchvision") is not None:
            import_torchvision_without_its_extension()
        import timm
    except Exception as e:  # ImportError, or RuntimeError from a torchvision that does not match torch
        pytest.skip(f"timm does not import here ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})")
    return timm
