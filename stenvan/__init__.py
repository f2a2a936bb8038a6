"""stenvan: fast, trustworthy training and evaluation of video person re-id models (STE-NVAN, NVAN).

The package is imported by `prepare/` for the shard format alone, so heavy modules (torch models, DALI)
are imported lazily: `stenvan.build_model` and `stenvan.Embedder` load the model code on first use.
"""

__version__ = "0.1.0"

__all__ = ["Embedder", "build_model", "__version__"]


def __getattr__(name):
    # Lazy export: `import stenvan` must stay cheap for the prepare workers (no torch import).
    if name == "build_model":
        from stenvan.models import build_model

        return build_model
    if name == "Embedder":
        from stenvan.embed import Embedder

        return Embedder
    raise AttributeError(f"module 'stenvan' has no attribute {name!r}")
