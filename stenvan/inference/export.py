"""ONNX export of a clip model: clips (B, T, 3, H, W) float32, normalised -> retrieval feature (B, 2048).

    path = export_onnx(model, "model.onnx", clip_len=8, height=256, width=128)
    check = compare_with_onnxruntime(model, path, clip_len=8, height=256, width=128)   # max error / max |feature|

The graph comes from torch's dynamo exporter (torch.export + onnxscript), opset 18, with a dynamic batch axis
and T, H, W fixed (STE-NVAN's temporal pooling and stripe tokens depend on them). The fused non-local attention
(SDPA, scale 1) exports as MatMul -> Softmax -> MatMul; should an exporter fail on it, the blocks switch to the
reference attention (the same computation written out; equivalence tested in tests/test_non_local.py) and the
export is retried. The model's input contract travels in the file's metadata_props (clip_len, height, width,
mean, std, layout, arch).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from stenvan.data.clips import IMAGENET_MEAN, IMAGENET_STD
from stenvan.models.non_local import NonLocalBlock

OPSET = 18
INPUT, OUTPUT = "clips", "features"


def _set_attention(model: torch.nn.Module, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, NonLocalBlock):
            m.attention = mode


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, *, clip_len: int, height: int, width: int,
                attention: str | None = None, metadata: dict | None = None, opset: int = OPSET) -> Path:
    """Write `model` (eval mode, on the CPU, fp32) as ONNX to `path`, atomically. attention: keep the model's
    (None), or force "fused" / "reference" in every non-local block."""
    try:  # fail before any work when the exporter's dependencies are missing
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxscript ({e}); pip install onnx onnxscript onnxruntime, "
                          "or pip install -e '.[test]'") from None

    check = getattr(model, "check_clip_length", None)
    if check is not None:
        check(clip_len)  # ValueError, e.g. STE-NVAN needs T multiple of 4
    model = model.cpu().float().eval()
    if attention is not None:
        _set_attention(model, attention)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    example = torch.randn(2, clip_len, 3, height, width)  # batch 2: a batch of 1 would be specialised away
    try:
        try:
            program = _export(model, example, opset)
        except Exception as e:  # noqa: BLE001 - exporter failures come in many types
            if attention == "reference" or not any(isinstance(m, NonLocalBlock) for m in model.modules()):
                raise
            print(f"export: the fused attention did not export ({type(e).__name__}); retrying with the reference "
                  "attention", file=sys.stderr)
            _set_attention(model, "reference")
            program = _export(model, example, opset)
        program.save(tmp, external_data=False)  # one self-contained file (ResNet-50: ~100 MB, far below 2 GB)
        _add_metadata(tmp, {"clip_len": clip_len, "height": height, "width": width, **(metadata or {})})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _export(model, example, opset):
    batch = torch.export.Dim("batch", min=1)
    return torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                             dynamic_shapes=({0: batch},), opset_version=opset, verbose=False)


def _add_metadata(path: Path, values: dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    contract = {"layout": "clips (B, T, 3, H, W) float32 RGB, resized to HxW, (x/255 - mean) / std; "
                          "features (B, 2048) = the post-BN retrieval feature (cosine distance)",
                "mean": ",".join(map(str, IMAGENET_MEAN)), "std": ",".join(map(str, IMAGENET_STD))}
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in {**contract, **values}.items()})
    onnx.save(proto, str(path))


def compare_with_onnxruntime(model: torch.nn.Module, path: str | os.PathLike, *, clip_len: int, height: int,
                             width: int, batch: int = 3, seed: int = 0) -> dict:
    """Run the ONNX file with onnxruntime (CPU) and the model in PyTorch on the same random clips.

    Returns {"max_abs_error", "max_abs_feature", "relative_error" = max_abs_error / max_abs_feature, "batch"}.
    """
    import onnxruntime as ort

    clips = torch.randn(batch, clip_len, 3, height, width, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model.cpu().float().eval()(clips).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT], {INPUT: clips.numpy()})
    error = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max())
    return {"max_abs_error": error, "max_abs_feature": scale, "relative_error": error / max(scale, 1e-12),
            "batch": batch, "shape": list(got.shape)}
