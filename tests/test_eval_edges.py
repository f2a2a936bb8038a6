"""Evaluations with nothing to score: an empty gallery is refused in one line before any feature is computed (the
old code scored it 0.00, exit 0); a protocol that scores no query reports null with a reason in metrics.json
(the old code wrote bare NaN, which most JSON parsers refuse), "n/a" in the table."""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pytest
from tiny_checkpoint import tiny_checkpoint

from prepare.cli import main as prepare_main
from stenvan.evaluation import Tracklets, evaluate_all, format_table, scalar_metrics


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def model(module_tmp):
    return tiny_checkpoint(module_tmp("edges") / "model.pt")


def dukev_shards(dukev_tree, tmp_path, keep_in_gallery):
    """DukeV shards whose gallery keeps only the tracklets `keep_in_gallery(pid, tracklet folder)` accepts."""
    tree = tmp_path / "tree"
    shutil.copytree(dukev_tree, tree)
    query = {(p.parent.name, p.name) for p in (tree / "query").glob("*/*")}
    for folder in list((tree / "gallery").glob("*/*")):
        if not keep_in_gallery((folder.parent.name, folder.name), query):
            shutil.rmtree(folder)
    for identity in (tree / "gallery").iterdir():
        if not any(identity.iterdir()):
            identity.rmdir()
    assert prepare_main(["dukev", "--data-dir", str(tree), "--out", str(tmp_path / "shards"), "--workers", "1"]) == 0
    return tmp_path / "shards"


def eval_main(capsys, *args):
    capsys.readouterr()
    code = importlib.import_module("eval").main([str(a) for a in args] + ["--loader", "torch", "--workers", "0",
                                                                          "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_empty_gallery_is_one_line_before_any_feature(model, dukev_tree, tmp_path, capsys):
    shards = dukev_shards(dukev_tree, tmp_path, lambda tracklet, query: False)
    assert json.loads((shards / "manifest.json").read_text())["splits"]["gallery"]["tracklets"] == []
    code, out, err = eval_main(capsys, "--checkpoint", model, "--data", shards, "--out", tmp_path / "eval")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "its gallery split is empty" in lines[0], (code, lines)
    assert "features:" not in out and not (tmp_path / "eval").exists()


def test_a_protocol_with_nothing_to_score_writes_null_with_a_reason(model, dukev_tree, tmp_path, capsys):
    """The gallery holds only the query tracklets' own copies (same camera): torchreid scores only queries with a
    match from another camera, and there is none."""
    shards = dukev_shards(dukev_tree, tmp_path, lambda tracklet, query: tracklet in query)
    code, out, err = eval_main(capsys, "--checkpoint", model, "--data", shards, "--out", tmp_path / "eval",
                               "--summary", tmp_path / "summary.json")
    assert code == 0, err
    metrics = strict_json((tmp_path / "eval" / "metrics.json").read_text())
    torchreid = metrics["torchreid"]
    assert torchreid["rank1"] is None and torchreid["mAP"] is None and torchreid["num_queries"] == 0
    assert torchreid["note"] == "nothing to score: no query has a match from another camera in its gallery"
    assert isinstance(metrics["official"]["mAP"], float)  # the others still score every query
    assert strict_json((tmp_path / "summary.json").read_text())["eval"]["torchreid"]["rank1"] is None
    assert "n/a" in out and "torchreid: nothing to score" in out and "nan" not in out


def test_protocols_report_why_they_scored_nothing():
    features = np.eye(4, dtype=np.float32)
    # two queries, each with only a same-camera copy in the gallery: no cross-camera match anywhere
    records = Tracklets(np.array(["q1", "q2", "g1", "g2"]), np.array([1, 2, 1, 2]), np.array([1, 1, 1, 1]),
                        np.array([True, True, False, False]), np.array([False, False, True, True]))
    results = evaluate_all(features, records)
    assert np.isnan(results["torchreid"]["mAP"]) and "no query has a match from another camera" in \
        results["torchreid"]["note"]
    assert results["official"]["mAP"] == 0.0 and "note" not in results["official"]  # scored, with AP 0
    assert scalar_metrics(results)["torchreid"]["rank1"] is None
    json.dumps(scalar_metrics(results), allow_nan=False)
    assert "torchreid: nothing to score" in format_table(results)
    no_gallery = Tracklets(records.keys, records.pids, records.camids, records.is_query, np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match="no gallery tracklets"):
        evaluate_all(features, no_gallery)
