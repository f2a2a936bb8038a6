"""stenvan: fast, trustworthy training and evaluation of video person re-id models (STE-NVAN, NVAN).

The public API (what the README's examples import; everything else is internal and may move):

    from stenvan import Embedder, build_model, load_original_checkpoint     # models and features
    from stenvan import TrackletTable, load_manifest, dataset_fingerprint   # reading prepared shards
    from stenvan import first_of_chunk_indices, read_frame, resize_frame    # the input contract, piece by piece

The library's parts, each a sub-package that imports only those listed before it:
- top-level modules, shared by every part: the shard format (shards), the person splits of iLIDS-VID and
  PRID-2011 (person_splits), the training config (config), the distributed set-up (distributed), the checkpoint
  format (checkpoint), folder locks (lock), one-line errors (errors), mixed precision (amp), what a command may
  write over (outputs), reading raw frame files safely (frame_files) and the one rule that decodes frames (decode);
- `stenvan.models`: the clip models; `stenvan.data`: the tracklet table, samplers and loaders;
- `stenvan.evaluation`: features of a prepared dataset, the protocols, re-ranking, plots;
- `stenvan.training`: the training run; `stenvan.inference`: embedding, search and ONNX export.
`prepare/` imports only the top-level modules.

`import stenvan` stays cheap (prepare's workers import it for the shard format): the names above are loaded on
first use.
"""

__version__ = "0.1.0"

# Public name -> the module that defines it, imported on first use (PEP 562).
_EXPORTS = {
    "Embedder": "stenvan.inference.embed",
    "read_frame": "stenvan.inference.embed",
    "resize_frame": "stenvan.data.clips",
    "build_model": "stenvan.models.video_net",
    "load_original_checkpoint": "stenvan.models.convert",
    "TrackletTable": "stenvan.data.table",
    "first_of_chunk_indices": "stenvan.data.sampling",
    "load_manifest": "stenvan.shards",
    "dataset_fingerprint": "stenvan.shards",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stenvan' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(__all__)
