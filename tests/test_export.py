"""export.py: ONNX graphs that onnxruntime runs to PyTorch's features (1e-4 relative), any batch; clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The test extra (setup.py) installs onnx, onnxscript and onnxruntime, so `make test` always runs these; a bare
# image without them (e.g. a GPU machine running `pytest -m gpu`) skips this module instead of failing collection.
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import export as export_cli  # noqa: E402
from tiny_checkpoint import SIZE, tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(module_tmp):
    return tiny_checkpoint(module_tmp("export") / "model.pt")


def features(path, clips: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["features"], {"clips": clips.numpy()})[0]


def assert_close(got, expected):
    """Relative to the largest feature magnitude (features near 0 make element-wise ratios meaningless)."""
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_onnx_reproduces_pytorch_features(checkpoint, tmp_path, capsys):
    from stenvan.evaluation.evaluate import load_model_for_eval

    out = tmp_path / "model.onnx"
    assert export_cli.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert "onnxruntime vs PyTorch" in capsys.readouterr().out
    model, _ = load_model_for_eval(str(checkpoint), None)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 2, 5):  # the batch axis is dynamic
        clips = torch.randn(batch, SIZE["clip_len"], 3, SIZE["height"], SIZE["width"], generator=generator)
        with torch.no_grad():
            expected = model(clips).numpy()
        assert_close(features(out, clips), expected)
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["clip_len"] == "4" and props["height"] == "32" and props["width"] == "16"
    assert props["arch"] == "ste_nvan" and props["mean"] == "0.485,0.456,0.406"
    (inp,) = proto.graph.input
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [4, 3, 32, 16]
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_falls_back_to_reference_attention(checkpoint, tmp_path, monkeypatch, capsys):
    """If the fused attention cannot be exported, the graph carries the reference attention: same features."""
    import stenvan.inference.export as export_lib
    from stenvan.evaluation.evaluate import load_model_for_eval

    real = export_lib._export
    attempts = []

    def fused_fails(model, example, opset):
        modes = {m.attention for m in model.modules() if isinstance(m, export_lib.NonLocalBlock)}
        attempts.append(modes)
        if modes == {"fused"}:
            raise RuntimeError("pretend the exporter has no rule for SDPA")
        return real(model, example, opset)

    monkeypatch.setattr(export_lib, "_export", fused_fails)
    model, _ = load_model_for_eval(str(checkpoint), None)
    path = export_lib.export_onnx(model, tmp_path / "ref.onnx", **SIZE)
    assert attempts == [{"fused"}, {"reference"}]
    assert "retrying with the reference attention" in capsys.readouterr().err
    fused, _ = load_model_for_eval(str(checkpoint), None)  # a fresh model: fused attention, PyTorch
    clips = torch.randn(3, SIZE["clip_len"], 3, SIZE["height"], SIZE["width"])
    with torch.no_grad():
        expected = fused.eval()(clips).numpy()
    assert_close(features(path, clips), expected)


def test_original_checkpoint_exports(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_convert import original_model

    torch.save(original_model("baseline", num_class=5).state_dict(), tmp_path / "R50_baseline_mean.pth")
    assert export_cli.main(["--checkpoint", str(tmp_path / "R50_baseline_mean.pth"), "--original-arch", "baseline",
                            "--out", str(tmp_path / "baseline.onnx"), "--clip-len", "2", "--height", "32",
                            "--width", "16"]) == 0
    assert (tmp_path / "baseline.onnx").stat().st_size > 50e6  # ResNet-50's weights are inside


def test_bad_input_is_one_clear_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    cases = [
        (["--checkpoint", checkpoint, "--clip-len", "6"], "multiple of 4"),
        (["--checkpoint", tmp_path / "missing.pt"], "not found"),
        (["--checkpoint", checkpoint, "--original-arch", "nvan"], "not an original nvan checkpoint"),
        (["--checkpoint", checkpoint, "--height", "40"], "multiples of 16"),
    ]
    for args, message in cases:
        assert export_cli.main([str(a) for a in args] + ["--out", str(out)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, lines)
    assert not list(tmp_path.iterdir())  # nothing written
