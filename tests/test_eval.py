"""eval.py end to end: metrics under the three protocols, features with their labels, plots, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prepare.cli import main as prepare_main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "ste_nvan", "--pretrained", "none", "--clip_len", "4", "--height", "32", "--width", "16",
        "--stripes", "2", "--ids_per_batch", "2", "--tracklets_per_id", "2", "--batches_per_epoch", "2",
        "--workers", "1", "--loader", "torch", "--max_steps", "2"]


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(mars_tree, module_tmp):
    root = module_tmp("eval")
    assert prepare_main(["mars", "--data-dir", str(mars_tree), "--out", str(root / "shards"), "--workers", "1"]) == 0
    result = run("train.py", "--data", root / "shards", "--out", root / "run", *TINY)
    assert result.returncode == 0, result.stderr
    return root


@pytest.mark.parametrize("loader, mode", [("torch", "dense"), ("dali", "paper")])
def test_eval_writes_every_output(trained, loader, mode):
    out = trained / f"eval-{loader}-{mode}"
    result = run("eval.py", "--checkpoint", trained / "run" / "last.pt", "--data", trained / "shards", "--mode", mode,
                 "--loader", loader, "--workers", "1", "--out", out, "--summary", trained / "summary.json",
                 "--label", f"{loader}-{mode}")
    assert result.returncode == 0, result.stderr
    for protocol in ("official", "standard", "torchreid"):
        assert protocol in result.stdout  # the printed table
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((trained / "shards" / "manifest.json").read_text())
    gallery = manifest["splits"]["gallery"]["tracklets"]
    num_queries = manifest["splits"]["query"]["num_tracklets"]
    for protocol in ("official", "standard", "torchreid"):
        m = metrics[protocol]
        assert set(m) >= {"rank1", "rank5", "rank10", "rank20", "mAP", "num_queries", "num_gallery"}
        assert 0 <= m["rank1"] <= m["rank5"] <= m["rank10"] <= m["rank20"] <= 1
    assert metrics["official"]["num_gallery"] == len(gallery)
    assert metrics["official"]["num_queries"] == num_queries
    assert metrics["standard"]["num_gallery"] == sum(not t["junk"] for t in gallery)
    assert metrics["torchreid"]["num_gallery"] == sum(not t["junk"] and not t["query"] for t in gallery)
    features = np.load(out / "features.npz")
    assert features["features"].shape == (len(gallery), 2048)
    assert [k.split("/", 1)[1] for k in features["keys"]] == [t["key"] for t in gallery]
    assert features["pids"].tolist() == [t["pid"] for t in gallery]
    assert features["is_query"].sum() == num_queries
    for png in ("cmc.png", "ranked_list.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((trained / "summary.json").read_text())
    assert summary[f"{loader}-{mode}"]["standard"] == metrics["standard"]


def test_untrained_differs_from_trained(trained):
    outs = {}
    for label, extra in (("trained", []), ("untrained", ["--untrained"])):
        out = trained / f"cmp-{label}"
        result = run("eval.py", "--checkpoint", trained / "run" / "last.pt", "--data", trained / "shards", "--loader",
                     "torch", "--workers", "1", "--out", out, *extra)
        assert result.returncode == 0, result.stderr
        outs[label] = np.load(out / "features.npz")["features"]
    assert not np.allclose(outs["trained"], outs["untrained"])


def test_original_checkpoint_through_the_converter(trained, tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from test_convert import original_model

    torch.save(original_model("baseline", num_class=5).state_dict(), tmp_path / "R50_baseline_mean.pth")
    result = run("eval.py", "--checkpoint", tmp_path / "R50_baseline_mean.pth", "--original-arch", "baseline", "--data",
                 trained / "shards", "--loader", "torch", "--workers", "1", "--height", "32", "--width", "16",
                 "--clip-len", "4", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["model"] == "original"


def test_bad_checkpoints_are_clear_errors(trained, tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pth")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    cases = [
        (["--checkpoint", tmp_path / "foreign.pth"], "not a stenvan checkpoint"),
        (["--checkpoint", tmp_path / "garbage.pt"], "cannot be loaded"),
        (["--checkpoint", tmp_path / "missing.pt"], "not found"),
        (["--checkpoint", tmp_path / "foreign.pth", "--original-arch", "nvan"], "not an original nvan checkpoint"),
        (["--checkpoint", trained / "run" / "last.pt", "--clip-len", "6"], "multiple of 4"),
    ]
    for args, message in cases:
        result = run("eval.py", *args, "--data", trained / "shards", "--loader", "torch")
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-500:])
    # a checkpoint whose weights belong to another model
    state = torch.load(trained / "run" / "last.pt", weights_only=True)
    state["model"].pop("head.classifier.weight")
    from stenvan.checkpoint import write_checkpoint_file

    state.pop("format"), state.pop("version")
    write_checkpoint_file(state, tmp_path / "other.pt")
    result = run("eval.py", "--checkpoint", tmp_path / "other.pt", "--data", trained / "shards", "--loader", "torch")
    assert result.returncode == 2 and "does not fit a ste_nvan model" in result.stderr
