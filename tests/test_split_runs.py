"""train.py --split N trains on the split's train persons (its classes) and records them; eval.py --split N scores
that split, refuses a split whose test persons the model trained on, labels a cross-dataset evaluation; LS-VID
reports its two galleries side by side, and its val set on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prepare.cli import main as prepare_main
from stenvan.checkpoint import read_checkpoint
from tests.video_trees import ilidsvid_tree, lsvid_tree

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "ste_nvan", "--pretrained", "none", "--clip_len", "4", "--height", "32", "--width", "16",
        "--stripes", "2", "--ids_per_batch", "2", "--tracklets_per_id", "2", "--batches_per_epoch", "2",
        "--epochs", "1", "--workers", "1", "--lr", "1e-3", "--log_every", "1", "--loader", "torch"]


def run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)


def train(data, out, *extra):
    result = run("train.py", "--data", data, "--out", out, *TINY, *extra)
    assert result.returncode == 0, result.stderr
    return out / "last.pt"


def evaluate(checkpoint, data, out, *extra):
    return run("eval.py", "--checkpoint", checkpoint, "--data", data, "--out", out, "--loader", "torch",
               "--workers", "0", *extra)


@pytest.fixture(scope="module")
def data(module_tmp, mars_tree):
    tmp = module_tmp("split_runs")
    shards = {"ilidsvid": tmp / "ilidsvid", "lsvid": tmp / "lsvid", "mars": tmp / "mars"}
    assert prepare_main(["ilidsvid", "--data-dir", str(ilidsvid_tree(tmp / "ilids_raw")), "--out",
                         str(shards["ilidsvid"]), "--workers", "1"]) == 0
    assert prepare_main(["lsvid", "--data-dir", str(lsvid_tree(tmp / "lsvid_raw")), "--out", str(shards["lsvid"]),
                         "--workers", "1"]) == 0
    assert prepare_main(["mars", "--data-dir", str(mars_tree), "--out", str(shards["mars"]), "--workers", "1"]) == 0
    return tmp, shards


@pytest.fixture(scope="module")
def ilids_model(data):
    tmp, shards = data
    return train(shards["ilidsvid"], tmp / "run_ilids_split0", "--split", "0")


def test_split_training_uses_the_split_train_persons_as_classes(ilids_model):
    state = read_checkpoint(ilids_model)
    # hand-built ls_set row 0 = [4, 1, 2, 3] over person002/005/009/013: train persons 5 and 9
    assert state["num_classes"] == 2
    assert state["config"]["split"] == 0
    assert state["train_data"] == {"dataset": "ilidsvid", "split": 0, "pids": [5, 9]}


def test_eval_scores_the_split_and_refuses_a_leaking_one(ilids_model, data, tmp_path):
    _, shards = data
    ok = evaluate(ilids_model, shards["ilidsvid"], tmp_path / "split0", "--split", "0")
    assert ok.returncode == 0, ok.stderr
    metrics = json.loads((tmp_path / "split0" / "metrics.json").read_text())
    assert metrics["split"] == 0 and metrics["dataset"] == "ilidsvid" and metrics["cross_dataset"] is False
    assert list(k for k, v in metrics.items() if isinstance(v, dict) and "mAP" in v) == ["cross_camera"]
    # test persons 2 and 13: one query (camera 1) each against their two camera-2 tracklets
    assert (metrics["cross_camera"]["num_queries"], metrics["cross_camera"]["num_gallery"]) == (2, 2)
    # split 1 = ls_set row [2, 3, 1, 4]: it tests persons 5 and 9, which the model trained on
    leak = evaluate(ilids_model, shards["ilidsvid"], tmp_path / "split1", "--split", "1")
    lines = leak.stderr.strip().splitlines()
    assert leak.returncode == 2 and len(lines) == 1 and "trained on iLIDS-VID split 0" in lines[0], leak.stderr
    assert "--split 0" in lines[0]
    assert not (tmp_path / "split1").exists()


def test_a_model_trained_on_another_dataset_is_evaluated_and_labelled(data, tmp_path):
    tmp, shards = data
    mars_model = train(shards["mars"], tmp / "run_mars")
    result = evaluate(mars_model, shards["ilidsvid"], tmp_path / "cross", "--split", "1")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "cross" / "metrics.json").read_text())
    assert metrics["cross_dataset"] is True and metrics["trained_on"] == {"dataset": "mars", "split": None}
    mars = evaluate(mars_model, shards["mars"], tmp_path / "mars")
    assert mars.returncode == 0, mars.stderr  # its own test set: no identity of its train split
    assert json.loads((tmp_path / "mars" / "metrics.json").read_text())["cross_dataset"] is False


def test_lsvid_two_galleries_side_by_side_and_val(data, tmp_path):
    tmp, shards = data
    model = train(shards["lsvid"], tmp / "run_lsvid")
    result = evaluate(model, shards["lsvid"], tmp_path / "test")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    # test list: 5 identity tracklets + 1 junk; queries = rows 1 and 4. sinet: gallery = test - queries - junk (3);
    # bicnet: every test tracklet but the junk one (5), queries included
    assert metrics["sinet"]["num_gallery"] == 3 and metrics["bicnet"]["num_gallery"] == 5
    assert "sinet" in result.stdout and "bicnet" in result.stdout
    val = evaluate(model, shards["lsvid"], tmp_path / "val", "--split", "val")
    assert val.returncode == 0, val.stderr
    val_metrics = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert val_metrics["split"] == "val" and list(k for k, v in val_metrics.items()
                                                  if isinstance(v, dict) and "mAP" in v) == ["bicnet"]
    # 4 val tracklets of 2 identities, each seen by 2 cameras: all four are queries with one true match each
    assert (val_metrics["bicnet"]["num_queries"], val_metrics["bicnet"]["num_gallery"]) == (4, 4)
