"""PNG frames are stored as their original bytes and decode to the pixels of the file through every path: the DALI
loader (CPU here, `mixed` on a GPU), the torch loader, `prepare verify --deep` and embed.py."""

from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from prepare.cli import main as prepare_main
from prepare.verify import verify
from stenvan.data import build_eval_loader
from stenvan.data.clips import IMAGENET_MEAN, IMAGENET_STD
from stenvan.inference.embed import read_frame
from tests.video_trees import prid_tree

HW = (32, 16)  # the frames are already the model's size: no resize, so the loaders must give the file's pixels
LENGTHS = {(p, c): 5 + p + c for p in (1, 2, 3, 4) for c in (1, 2)}
SPLITS = [{"train": ["person_0001", "person_0003"], "test": ["person_0002", "person_0004"]}] * 10


@pytest.fixture(scope="module")
def png_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("png")
    root = prid_tree(tmp / "prid2011", LENGTHS, SPLITS, hw=HW)
    out = tmp / "shards"
    assert prepare_main(["prid2011", "--data-dir", str(root), "--out", str(out), "--workers", "1"]) == 0
    return root, out


def source_frames(root, source: str, names: list[str]) -> np.ndarray:
    """(F, H, W, 3) uint8: the files decoded by Pillow."""
    return np.stack([np.asarray(Image.open(root / source / n).convert("RGB")) for n in names])


def test_png_members_hold_the_original_bytes(png_data):
    root, out = png_data
    manifest = json.loads((out / "manifest.json").read_text())
    with tarfile.open(out / manifest["shards"][0]["name"]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    meta = json.loads(members["person_0002_A.json"])
    assert meta["frames"] == [f"{i:04d}.png" for i in range(1, LENGTHS[(2, 1)] + 1)]
    for i, name in enumerate(meta["frames"]):
        stored = members[f"person_0002_A.{i:05d}.png"]
        assert hashlib.sha256(stored).digest() == hashlib.sha256((root / meta["source"] / name).read_bytes()).digest()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_both_loaders_give_the_pixels_of_the_files(png_data, backend):
    root, out = png_data
    loader = build_eval_loader(out, "query", mode="dense", clip_len=4, height=HW[0], width=HW[1], batch_size=3,
                               backend=backend, workers=1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    seen = 0
    with loader:
        clips = iter(loader.clips)
        for batch in loader:
            for clip, index in zip(batch["clips"], batch["tracklet"].tolist()):
                spec = next(clips)
                pixels = (clip.float() * std + mean).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (T,H,W,3)
                meta = loader.table.metadata(index)
                expected = source_frames(root, meta["source"], [meta["frames"][f] for f in spec.frames])
                np.testing.assert_array_equal(pixels, expected)
                seen += 1
    assert seen == len(loader.clips) > 0


@pytest.mark.gpu
def test_dali_mixed_decode_gives_the_pixels_of_the_files(png_data):
    root, out = png_data
    loader = build_eval_loader(out, "gallery", mode="dense", clip_len=4, height=HW[0], width=HW[1], batch_size=3,
                               backend="dali", workers=1, device="cuda")
    mean = torch.tensor(IMAGENET_MEAN, device="cuda").view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device="cuda").view(1, 3, 1, 1) * 255
    with loader:
        clips = iter(loader.clips)
        for batch in loader:
            for clip, index in zip(batch["clips"], batch["tracklet"].tolist()):
                spec = next(clips)
                pixels = (clip.float() * std + mean).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                meta = loader.table.metadata(index)
                np.testing.assert_array_equal(pixels, source_frames(root, meta["source"],
                                                                    [meta["frames"][f] for f in spec.frames]))


def test_embed_reads_png_as_the_file(png_data):
    root, _ = png_data
    frame = root / "prid_2011" / "multi_shot" / "cam_b" / "person_0003" / "0004.png"
    np.testing.assert_array_equal(read_frame(frame).permute(1, 2, 0).numpy(),
                                  np.asarray(Image.open(frame).convert("RGB")))


def test_verify_deep_decodes_png_and_finds_a_damaged_one(png_data, tmp_path):
    _, out = png_data
    assert verify(out, deep=True) == []
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = copy / manifest["shards"][0]["name"]
    index = (copy / manifest["shards"][0]["index"]).read_text().splitlines()[1].split()
    offset, size = int(index[5]), int(index[6])  # the first frame member
    data = bytearray(shard.read_bytes())
    data[offset + size // 2] ^= 0xFF  # inside the compressed image data: its CRC no longer matches
    shard.write_bytes(bytes(data))
    problems = verify(copy, deep=True)
    assert any("cannot be decoded" in p and index[7] in p for p in problems), problems
