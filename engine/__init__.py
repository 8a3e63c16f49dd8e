"""iws-engine: compiled inference for the Internal Waves Service.

Classifies Sentinel-1 Wave-mode SAR vignettes (PNG) for internal solitary waves.
The import is deliberately light: heavy or GPU-only libraries (torch, onnxruntime,
TensorRT, CuPy, nvCOMP, DALI, pynvml) are imported inside the modules that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "Classifier", "classify", "EvaXgbClassifier", "BatchingClassifier"]


def __getattr__(name):  # PEP 562: keep `import iws_engine` cheap
    if name in ("Classifier", "classify"):
        from iws_engine import api

        return getattr(api, name)
    if name == "EvaXgbClassifier":  # Pipeline A (EVA02 + XGBoost)
        from iws_engine import pipeline_a

        return pipeline_a.EvaXgbClassifier
    if name == "BatchingClassifier":  # one model shared by many threads/tasks, dynamic batching
        from iws_engine import batching

        return batching.BatchingClassifier
    raise AttributeError(f"module 'iws_engine' has no attribute {name!r}")
