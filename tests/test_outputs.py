"""No output replaces an input or a file of another kind, for every entry point (stenvan.outputs); an --out that
cannot be used is one line before any work; an earlier output of the same kind is replaced only with --force."""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pytest
from prepare_helpers import shard_mars
from tiny_checkpoint import tiny_checkpoint


@pytest.fixture(scope="module")
def inputs(mars_tree, module_tmp):
    root = module_tmp("outputs")
    shard_mars(mars_tree, root / "shards")
    tiny_checkpoint(root / "model.pt")
    for frame in sorted((mars_tree / "bbox_test").glob("*/*.jpg"))[:12]:  # a few tracklet folders for embed.py
        folder = root / "tracklets" / frame.name[:11]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(frame, folder / frame.name)
    return root


def one_line(capsys, tool: str, *args) -> str:
    """Run an entry point's main: exit code 2 and exactly one line on stderr."""
    capsys.readouterr()
    main = importlib.import_module("prepare.cli" if tool == "prepare" else tool).main
    code = main([str(a) for a in args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), (code, lines)
    return lines[0]


def snapshot(*paths) -> dict:
    return {str(p): p.read_bytes() for root in paths for p in ([root] if root.is_file() else root.rglob("*"))
            if p.is_file()}


def test_an_output_never_replaces_an_input_or_a_file_of_another_kind(inputs, tmp_path, capsys):
    """The old code replaced the trained weights with the ONNX file or the features (exit 0), and a dataset's
    manifest with an ONNX file."""
    model, shards, tracklets = inputs / "model.pt", inputs / "shards", inputs / "tracklets"
    before = snapshot(model, shards)
    (tmp_path / "notes.txt").write_text("mine")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    cases = [
        ("export", ["--checkpoint", model, "--out", model], "is the --checkpoint of this command"),
        ("export", ["--checkpoint", model, "--out", shards / "manifest.json"], "a prepared dataset's manifest"),
        ("export", ["--checkpoint", model, "--out", shards / "train-00000.tar"], "a tar archive"),
        ("embed", ["--checkpoint", model, "--tracklets", tracklets, "--out", model], "is the --checkpoint"),
        ("embed", ["--checkpoint", model, "--tracklets", tracklets, "--out", inputs / "model.pt.sha256"],
         "a checkpoint's .sha256"),
        ("embed", ["--checkpoint", model, "--tracklets", tracklets, "--out", tmp_path / "notes.txt"],
         "a file of another kind"),
        ("embed", ["--checkpoint", model, "--tracklets", tracklets, "--out", tmp_path / "other.npz"],
         "a zip or .npz file"),
        ("embed", ["--checkpoint", model, "--tracklets", tracklets, "--out", tracklets / "f.npz"],
         "lies inside the --tracklets folder"),
        ("embed", ["--checkpoint", model, "--query", tracklets, "--gallery", tracklets, "--out", shards],
         "a dataset prepared by `python -m prepare`"),
        ("eval", ["--checkpoint", model, "--data", shards, "--out", shards / "eval"], "lies inside the --data"),
        ("eval", ["--checkpoint", model, "--data", shards, "--out", inputs], "holds the --checkpoint"),
        ("eval", ["--checkpoint", model, "--data", shards, "--out", tmp_path], "holds 2 other entries"),
        ("eval", ["--checkpoint", model, "--data", shards, "--summary", shards / "manifest.json"], "lies inside"),
        ("train", ["--data", shards, "--out", shards], "is the --data of this command"),
        ("train", ["--data", shards, "--out", tmp_path], "holds 2 other entries"),
        ("prepare", ["mars", "--data-dir", shards, "--out", shards / "again"], "lies inside the --data-dir"),
        ("prepare", ["mars", "--data-dir", tracklets, "--out", tmp_path], "holds 2 other entries"),
    ]
    for tool, args, message in cases:
        line = one_line(capsys, tool, *args)
        assert message in line and "choose another" in line, (tool, args, line)
    assert snapshot(model, shards) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other.npz"]


def test_an_unusable_out_is_one_line_before_any_work(inputs, tmp_path, capsys):
    """Checked first: the checkpoint named here does not exist, so any later check would say so instead."""
    missing = tmp_path / "missing.pt"
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    long_name = "x" * 300 + ".npz"
    cases = [
        ("export", ["--checkpoint", missing, "--out", "/"], "is the filesystem's root"),
        ("eval", ["--checkpoint", missing, "--data", inputs / "shards", "--out", "/"], "is the filesystem's root"),
        ("train", ["--data", inputs / "shards", "--out", "/"], "is the filesystem's root"),
        ("prepare", ["synthetic", "--layout", "mars", "--out", "/"], "is the filesystem's root"),
        ("export", ["--checkpoint", missing, "--out", tmp_path / "folder"], "is a folder; --out names the file"),
        ("export", ["--checkpoint", missing, "--out", f"{tmp_path / 'new'}/"], "ends with '/'"),
        ("export", ["--checkpoint", missing, "--out", tmp_path / "file" / "x.onnx"], "is a file, not a folder"),
        ("embed", ["--checkpoint", missing, "--tracklets", inputs / "tracklets", "--out", tmp_path / long_name],
         "longer than file systems allow"),
        ("eval", ["--checkpoint", missing, "--data", inputs / "shards", "--out", tmp_path / "file"],
         "exists and is not a folder"),
        ("prepare", ["dukev", "--data-dir", tmp_path / "folder", "--out", tmp_path / "file" / "shards"],
         "is a file, not a folder"),
    ]
    for tool, args, message in cases:
        line = one_line(capsys, tool, *args)
        assert message in line, (tool, args, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


def test_an_earlier_output_of_the_same_kind_is_replaced_only_with_force(inputs, tmp_path, capsys):
    model, tracklets = inputs / "model.pt", inputs / "tracklets"
    args = ["--checkpoint", model, "--tracklets", tracklets, "--workers", "0", "--out", tmp_path / "f.npz"]
    embed = importlib.import_module("embed").main
    assert embed([str(a) for a in args]) == 0
    first = (tmp_path / "f.npz").read_bytes()
    assert "holds features written by embed.py already; pass --force" in one_line(capsys, "embed", *args)
    assert embed([str(a) for a in args] + ["--mode", "dense", "--force"]) == 0
    assert (tmp_path / "f.npz").read_bytes() != first
    # an earlier export (recognised by its metadata), an earlier evaluation (its metrics.json)
    onnx = pytest.importorskip("onnx")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["clips"], ["features"])], "g",
                                   [onnx.helper.make_tensor_value_info("clips", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [1])])
    proto = onnx.helper.make_model(graph)
    onnx.helper.set_model_props(proto, {k: "1" for k in ("clip_len", "height", "width", "mean", "std", "layout")})
    onnx.save(proto, str(tmp_path / "model.onnx"))
    line = one_line(capsys, "export", "--checkpoint", model, "--out", tmp_path / "model.onnx")
    assert "holds an ONNX model written by export.py already; pass --force to replace it" in line
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"official": {"rank1": 0.5}, "checkpoint": "x"}))
    line = one_line(capsys, "eval", "--checkpoint", model, "--data", inputs / "shards", "--out", tmp_path / "eval")
    assert "holds the outputs of eval.py already; pass --force to replace it" in line


def test_eval_summary_must_be_a_summary(inputs, tmp_path, capsys):
    """A JSON list (or any other file) as --summary: one line before any work, not a TypeError after the outputs."""
    for name, content in (("list.json", "[1, 2]"), ("metrics.json", json.dumps({"official": {}, "checkpoint": "x"})),
                          ("text.json", "hello")):
        (tmp_path / name).write_text(content)
        line = one_line(capsys, "eval", "--checkpoint", inputs / "model.pt", "--data", inputs / "shards", "--out",
                        tmp_path / "out", "--summary", tmp_path / name)
        assert f"{tmp_path / name}: holds " in line and "not an eval.py --summary file" in line, line
        assert (tmp_path / name).read_text() == content
    assert not (tmp_path / "out").exists()
