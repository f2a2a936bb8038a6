"""Using a trained model: tracklet embeddings (embed.py, `stenvan.Embedder`), gallery search (search.py) and ONNX
export (export.py).

May import: the shared top-level modules, stenvan.models, stenvan.data and stenvan.evaluation (the features and
distances are eval's own). Nothing in stenvan imports it but the lazy `stenvan.Embedder`.
"""
