"""embed.py and stenvan.Embedder: eval.py's features for folders of frames, arrays and shards; clear errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import embed as embed_cli
from prepare.cli import main as prepare_main
from tiny_checkpoint import SIZE, tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def tracklet_folders(split_dir: Path, out: Path) -> Path:
    """MARS frames PPPPCcTttttFfff.jpg of one split, regrouped as one folder per tracklet (key = first 11 chars)."""
    for frame in sorted(split_dir.glob("*/*.jpg")):
        folder = out / frame.name[:11]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(frame, folder / frame.name)
    return out


@pytest.fixture(scope="module")
def data(mars_tree, module_tmp):
    root = module_tmp("embed")
    assert prepare_main(["mars", "--data-dir", str(mars_tree), "--out", str(root / "shards"), "--workers", "1"]) == 0
    tracklet_folders(mars_tree / "bbox_test", root / "tracklets")
    tiny_checkpoint(root / "model.pt")
    return root


def load(path) -> dict[str, np.ndarray]:
    """key -> feature from an embed.py or eval.py features.npz (eval's keys carry a "<split>/" prefix)."""
    f = np.load(path)
    return {str(k).split("/")[-1]: v for k, v in zip(f["keys"], f["features"])}


@pytest.mark.parametrize("mode", ["paper", "dense"])
def test_embedding_equals_eval_features(data, tmp_path, mode):
    """The same frames through embed.py (folders of JPEGs) and eval.py (shards, its torch loader): same features."""
    result = subprocess.run([sys.executable, "eval.py", "--checkpoint", data / "model.pt", "--data", data / "shards",
                             "--loader", "torch", "--workers", "1", "--mode", mode, "--out", tmp_path / "eval"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert embed_cli.main(["--checkpoint", str(data / "model.pt"), "--tracklets", str(data / "tracklets"),
                           "--out", str(tmp_path / "f.npz"), "--mode", mode, "--workers", "1"]) == 0
    ours, theirs = load(tmp_path / "f.npz"), load(tmp_path / "eval" / "features.npz")
    assert sorted(ours) == sorted(theirs)
    lengths = dict(zip(np.load(tmp_path / "f.npz")["keys"].tolist(), np.load(tmp_path / "f.npz")["num_frames"]))
    assert any(n % SIZE["clip_len"] for n in lengths.values()) and min(lengths.values()) < SIZE["clip_len"]
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert max(np.abs(ours[k] - ours[next(iter(ours))]).max() for k in ours) > 0.1  # features differ by tracklet
    # a prepared split: eval's own extraction, by key
    assert embed_cli.main(["--checkpoint", str(data / "model.pt"), "--tracklets", str(data / "shards"), "--split",
                           "gallery", "--loader", "torch", "--out", str(tmp_path / "s.npz"), "--mode", mode,
                           "--workers", "1"]) == 0
    split = np.load(tmp_path / "s.npz")
    assert set(split) == {"keys", "features", "num_frames", "pids", "camids"}
    for key, feature in load(tmp_path / "s.npz").items():
        np.testing.assert_array_equal(feature, theirs[key])


def test_library_call_takes_arrays_paths_and_png(data, tmp_path):
    from stenvan import Embedder
    from stenvan.inference.embed import list_tracklets, read_frame

    embedder = Embedder(data / "model.pt", workers=0)
    key, paths = max(list_tracklets(data / "tracklets"), key=lambda t: len(t[1]))
    from_paths = embedder.embed(paths)
    frames = np.stack([read_frame(p).permute(1, 2, 0).numpy() for p in paths])  # (F, H, W, 3) uint8 RGB
    assert from_paths.shape == (2048,) and from_paths.dtype == np.float32
    np.testing.assert_array_equal(embedder.embed(frames), from_paths)
    # PNG frames holding the same pixels give the same feature (any size: the embedder resizes)
    png = tmp_path / "png" / key
    png.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(png / f"{i:04d}.png")
    np.testing.assert_array_equal(embedder.embed_folder(png.parent, progress=False).features[0], from_paths)
    assert np.abs(embedder.embed(frames[:1]) - from_paths).max() > 1e-3  # other frames, another feature


def error_of(capsys, *args) -> str:
    """Run embed.py's main, expect exit code 2 and exactly one line on stderr; return it."""
    assert embed_cli.main([str(a) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_is_one_clear_line(data, tmp_path, capsys):
    model, out = data / "model.pt", tmp_path / "out.npz"
    base = ["--checkpoint", model, "--out", out, "--workers", "0"]
    empty = tmp_path / "empty"
    (empty / "0001C1T0001").mkdir(parents=True)
    assert "0001C1T0001: no JPEG or PNG frames" in error_of(capsys, *base, "--tracklets", empty)
    broken = tmp_path / "broken" / "0001C1T0001"
    broken.mkdir(parents=True)
    (broken / "0001.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    assert "0001.jpg: cannot be decoded" in error_of(capsys, *base, "--tracklets", broken.parent)
    tracklets = data / "tracklets"
    assert "multiple of 4" in error_of(capsys, *base, "--tracklets", tracklets, "--clip-len", "6")
    assert "not found" in error_of(capsys, "--checkpoint", tmp_path / "missing.pt", "--out", out, "--tracklets",
                                   tracklets)
    assert "missing: no such folder" in error_of(capsys, *base, "--tracklets", tmp_path / "missing")
    # a checkpoint whose weights belong to another model
    import torch

    from stenvan.checkpoint import write_checkpoint_file

    state = torch.load(model, weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("non_local.")}
    state.pop("format"), state.pop("version")
    write_checkpoint_file(state, tmp_path / "other.pt")
    assert "does not fit a ste_nvan model" in error_of(capsys, "--checkpoint", tmp_path / "other.pt", "--out", out,
                                                       "--tracklets", tracklets)
    assert "not an original nvan checkpoint" in error_of(capsys, *base, "--tracklets", tracklets, "--original-arch",
                                                         "nvan")
    assert "search needs both" in error_of(capsys, *base, "--query", tracklets)
    assert "--drop-junk needs identities" in error_of(capsys, "--checkpoint", model, "--out", tmp_path / "s",
                                                      "--query", tracklets, "--gallery", tracklets, "--drop-junk")
    assert not out.exists() and not (tmp_path / "s").exists()  # nothing written on any error


# ------------------------------------------------------------------------------------------------------------------
# Search
# ------------------------------------------------------------------------------------------------------------------

def fine_tune(model, shards: Path, steps: int = 200, clips: int = 32):
    """Train the last 1x1 conv of the baseline's last bottleneck (conv3 + bn3, 512 -> 2048) and the head on the
    train split, `steps` Adam steps on cached inputs.

    Training a whole ResNet-50 until it ranks well takes the demo's ~10 CPU minutes; with everything before that
    conv frozen at its (random) initial weights, its inputs are computed once and a step costs one 1x1 conv.
    """
    import torch

    from stenvan.data import TrackletTable, build_eval_loader
    from stenvan.training.losses import ReIDLoss

    last = model.backbone.layer4[-1]  # torchvision Bottleneck: relu(bn3(conv3(h)) + x)
    labels = TrackletTable.from_dir(shards, "train").labels
    inputs, hidden, targets = [], [], []
    with torch.no_grad():
        for batch in build_eval_loader(shards, "train", mode="dense", batch_size=16, backend="torch", workers=0,
                                       **SIZE):
            b, t = batch["clips"].shape[:2]
            x = model.backbone.stem(batch["clips"].flatten(0, 1))  # (B·T, 64, H/4, W/4)
            for layer in (model.backbone.layer1, model.backbone.layer2, model.backbone.layer3):
                x = layer(x)
            for block in model.backbone.layer4[:-1]:
                x = block(x)  # (B·T, 2048, H/16, W/16)
            h = last.relu(last.bn2(last.conv2(last.relu(last.bn1(last.conv1(x))))))  # (B·T, 512, H/16, W/16)
            inputs.append(x.view(b, t, *x.shape[1:]))
            hidden.append(h.view(b, t, *h.shape[1:]))
            targets.append(torch.from_numpy(labels[batch["tracklet"].numpy()]))
    inputs, hidden, targets = torch.cat(inputs), torch.cat(hidden), torch.cat(targets)
    params = [*last.conv3.parameters(), *last.bn3.parameters(), model.head.bn.weight, model.head.classifier.weight]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    loss_fn = ReIDLoss()
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(0, len(targets), (clips,), generator=generator)
        x, h = inputs[pick].flatten(0, 1), hidden[pick].flatten(0, 1)
        y = last.relu(last.bn3(last.conv3(h)) + x).view(clips, -1, *x.shape[1:])  # (B, T, 2048, h, w)
        loss = loss_fn(*model.head(y), targets[pick])["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def searched(module_tmp):
    """Query = the first tracklet of each train identity, gallery = the other train tracklets, as tracklet folders;
    a baseline model fine-tuned on that split, and the same model untrained."""
    from prepare.synthetic import generate
    from tiny_checkpoint import tiny_config, tiny_model, write_checkpoint

    root = module_tmp("search")
    generate("mars", root / "raw", num_ids=16, seed=3, min_len=4, max_len=16)
    assert prepare_main(["mars", "--data-dir", str(root / "raw"), "--out", str(root / "shards"), "--workers", "1"]) == 0
    folders = tracklet_folders(root / "raw" / "bbox_train", root / "all")
    (root / "query").mkdir()
    seen = set()
    for folder in sorted(folders.iterdir()):
        if folder.name[:4] not in seen:  # the identity's first tracklet becomes its query
            seen.add(folder.name[:4])
            folder.rename(root / "query" / folder.name)
    folders.rename(root / "gallery")
    cfg = tiny_config("baseline")
    num_ids = len(seen)
    write_checkpoint(root / "untrained.pt", tiny_model(cfg, num_ids), cfg, num_ids)
    write_checkpoint(root / "trained.pt", fine_tune(tiny_model(cfg, num_ids), root / "shards"), cfg, num_ids)
    return root


def run_search(root: Path, model: str, out: Path, *extra) -> list[list[str]]:
    assert embed_cli.main(["--checkpoint", str(root / model), "--query", str(root / "query"), "--gallery",
                           str(root / "gallery"), "--top-k", "5", "--out", str(out), "--workers", "1", *extra]) == 0
    import csv

    with open(out / "ranking.csv") as f:
        return list(csv.reader(f))


def test_search_ranks_true_matches_first_for_a_trained_model(searched, tmp_path):
    rows = run_search(searched, "trained.pt", tmp_path / "trained")
    assert rows[0] == ["query", "rank", "gallery", "distance"]
    queries = sorted(p.name for p in (searched / "query").iterdir())
    top = {q: g for q, rank, g, _ in rows[1:] if rank == "1"}
    assert sorted(top) == queries and len(queries) >= 6
    assert all(g[:4] == q[:4] for q, g in top.items()), top  # every query's best match is its own identity
    # the ranking is the exact, stable order of the features' cosine distances
    q, g = np.load(tmp_path / "trained" / "query.npz"), np.load(tmp_path / "trained" / "gallery.npz")
    qf = q["features"] / np.linalg.norm(q["features"], axis=1, keepdims=True)
    gf = g["features"] / np.linalg.norm(g["features"], axis=1, keepdims=True)
    dist = 1 - qf @ gf.T
    for i, key in enumerate(q["keys"]):
        listed = [(r[2], float(r[3])) for r in rows[1:] if r[0] == key]
        order = np.argsort(dist[i], kind="stable")[:5]
        assert [k for k, _ in listed] == g["keys"][order].tolist()
        np.testing.assert_allclose([d for _, d in listed], dist[i, order], atol=1e-5)
    pictures = sorted((tmp_path / "trained" / "ranked").iterdir())
    assert len(pictures) == len(queries) and pictures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the test can fail: the same model before training does not rank every true match first
    rows = run_search(searched, "untrained.pt", tmp_path / "untrained", "--pictures", "0")
    assert not all(g[:4] == q[:4] for q, rank, g, _ in rows[1:] if rank == "1")


def test_search_rerank_and_shards_with_identities(searched, tmp_path):
    from stenvan.evaluation import pairwise_distance
    from stenvan.evaluation.rerank import re_ranking

    rows = run_search(searched, "trained.pt", tmp_path / "rr", "--rerank", "--pictures", "1")
    assert rows[0] == ["query", "rank", "gallery", "distance", "original_distance"]
    q, g = np.load(tmp_path / "rr" / "query.npz"), np.load(tmp_path / "rr" / "gallery.npz")
    qf, gf = q["features"], g["features"]
    expected = re_ranking(pairwise_distance(qf, gf), pairwise_distance(qf, qf), pairwise_distance(gf, gf))
    for i, key in enumerate(q["keys"]):
        listed = [r for r in rows[1:] if r[0] == key]
        order = np.argsort(expected[i], kind="stable")[:5]
        assert [r[2] for r in listed] == g["keys"][order].tolist()
        np.testing.assert_allclose([float(r[3]) for r in listed], expected[i, order], atol=1e-5)
    # prepared shards carry identities: statuses as in eval, and --drop-junk leaves same-camera matches out
    shards = searched / "shards"
    assert embed_cli.main(["--checkpoint", str(searched / "trained.pt"), "--query", str(shards), "--gallery",
                           str(shards), "--top-k", "50", "--drop-junk", "--loader", "torch", "--out",
                           str(tmp_path / "sh"), "--workers", "1", "--pictures", "2"]) == 0
    import csv
    import json

    with open(tmp_path / "sh" / "ranking.csv") as f:
        rows = list(csv.DictReader(f))
    manifest = json.loads((shards / "manifest.json").read_text())
    label = {t["key"]: (t["pid"], t["camid"]) for t in manifest["splits"]["gallery"]["tracklets"]}
    assert {r["query"] for r in rows} == {t["key"] for t in manifest["splits"]["query"]["tracklets"]}
    for r in rows:
        (qp, qc), (gp, gc) = label[r["query"]], label[r["gallery"]]
        assert gp != -1 and not (qp == gp and qc == gc)  # junk dropped
        assert r["status"] == ("correct" if qp == gp else "wrong")
    assert len(list((tmp_path / "sh" / "ranked").iterdir())) == 2


def test_top_k_in_chunks_equals_a_full_stable_sort():
    import torch

    from stenvan.inference.search import top_k

    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(50, 8)).astype(np.float32)
    gallery[10:20] = gallery[0]  # ties: equal distances keep gallery order
    query = np.concatenate([gallery[:3], rng.normal(size=(4, 8)).astype(np.float32)])
    for metric in ("cosine", "euclidean"):
        idx, dist = top_k(query, gallery, k=15, metric=metric, device=torch.device("cpu"), max_block_floats=60)
        from stenvan.evaluation import pairwise_distance

        full = pairwise_distance(query, gallery, metric)
        order = np.argsort(full, axis=1, kind="stable")[:, :15]
        np.testing.assert_array_equal(idx, order)
        np.testing.assert_allclose(dist, np.take_along_axis(full, order, 1), atol=1e-6)
    # labels: same identity and camera, and label -1, rank last with distance inf
    pids, cams = np.arange(50) % 5, np.arange(50) % 3
    pids[-1] = -1
    idx, dist = top_k(gallery[:2], gallery, k=50, labels=(pids[:2], cams[:2], pids, cams))
    for i in range(2):
        junk = ((pids == pids[i]) & (cams == cams[i])) | (pids == -1)
        assert set(idx[i][np.isinf(dist[i])]) == set(np.flatnonzero(junk))


def test_a_frame_that_fails_in_a_worker_is_one_line(data, tmp_path, capsys):
    """With decoding workers (the default --workers 2), the old error line carried the worker's traceback."""
    broken = tmp_path / "broken"
    for i, folder in enumerate(sorted((data / "tracklets").iterdir())[:3]):
        shutil.copytree(folder, broken / folder.name)
        if i == 2:
            next((broken / folder.name).iterdir()).write_bytes(b"\xff\xd8 not a JPEG")
    line = error_of(capsys, "--checkpoint", data / "model.pt", "--tracklets", broken, "--out", tmp_path / "f.npz",
                    "--workers", "2")
    assert "cannot be decoded as a JPEG or PNG image" in line and "Traceback" not in line
    assert not (tmp_path / "f.npz").exists()


def test_search_with_a_query_name_too_long_for_a_file_name(searched, tmp_path):
    """A 250-character query folder: its picture's name is cut to fit (the old code raised OSError after part
    of the outputs were written); the outputs appear together or not at all."""
    query = tmp_path / "query"
    first = sorted((searched / "query").iterdir())[0]
    long_key = first.name + "_" + "x" * (250 - len(first.name) - 1)
    shutil.copytree(first, query / long_key)
    out = tmp_path / "out"
    assert embed_cli.main(["--checkpoint", str(searched / "untrained.pt"), "--query", str(query), "--gallery",
                           str(searched / "gallery"), "--top-k", "3", "--out", str(out), "--workers", "0"]) == 0
    (picture,) = (out / "ranked").iterdir()
    assert picture.name.startswith("0000_" + first.name) and len(picture.name) < 200
    assert sorted(p.name for p in out.iterdir()) == ["gallery.npz", "query.npz", "ranked", "ranking.csv"]
    assert long_key in (out / "ranking.csv").read_text()
    # an earlier search is replaced only with --force, as a whole: no picture of the earlier one stays behind
    args = ["--checkpoint", str(searched / "untrained.pt"), "--query", str(query), "--gallery",
            str(searched / "gallery"), "--top-k", "3", "--out", str(out), "--workers", "0", "--pictures", "0"]
    assert embed_cli.main(args) == 2
    assert embed_cli.main(args + ["--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gallery.npz", "query.npz", "ranking.csv"]
