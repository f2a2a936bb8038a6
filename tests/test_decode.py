"""Every path decodes the same pixels (stenvan.decode): DALI's pipeline (CPU here; `mixed` in the gpu test),
the torch loader, embed.py and the ONNX recipe's read_frame agree on EXIF-rotated, grayscale, CMYK, progressive,
16-bit, RGBA, palette and grayscale-alpha frames, and the pixels are those of the rule (PIL without EXIF
transposition, as the original code read frames; 16-bit samples rounded to 8 bits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from odd_images import odd_jpegs, odd_pngs, reference
from PIL import Image
from prepare_helpers import shard_mars

from stenvan.data import build_eval_loader
from stenvan.data.clips import IMAGENET_MEAN, IMAGENET_STD
from stenvan.decode import dali_decode, decode_frame
from stenvan.inference.embed import read_frame

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def dali_pixels(encoded: list[bytes], gpu: bool = False) -> list[np.ndarray]:
    """The pipelines' decoder node (stenvan.decode.dali_decode) on these bytes, one sample each."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(encoded), num_threads=1, device_id=0 if gpu else None)
    def pipe():
        data = fn.external_source(source=lambda: [np.frombuffer(d, dtype=np.uint8) for d in encoded], batch=True)
        return dali_decode(data, gpu)

    p = pipe()
    p.build()
    (out,) = p.run()
    out = out.as_cpu() if gpu else out
    return [np.array(out[i]) for i in range(len(encoded))]


@pytest.fixture(scope="module")
def pixels():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:24]
    rgb = np.stack([x * 10, y * 5, (x + y) * 4], axis=-1).astype(np.uint8)
    rgb[8:20, 4:12] = rng.integers(0, 256, (12, 8, 3))  # texture, so that a rotation cannot look the same
    return rgb


def test_every_decoder_follows_the_rule(pixels, tmp_path):
    frames = {name: (data, reference(data)) for name, data in odd_jpegs(pixels).items()}
    frames.update(odd_pngs(pixels))
    dali = dali_pixels([data for data, _ in frames.values()])
    for (name, (data, expected)), from_dali in zip(frames.items(), dali):
        assert expected.shape == pixels.shape, name  # stored 48x24: a rotation is never applied
        np.testing.assert_array_equal(hwc(decode_frame(data)), expected, err_msg=name)
        np.testing.assert_array_equal(from_dali, expected, err_msg=f"DALI {name}")
        (tmp_path / f"{name}.img").write_bytes(data)
        np.testing.assert_array_equal(hwc(read_frame(tmp_path / f"{name}.img")), expected, err_msg=f"read_frame {name}")


@pytest.mark.gpu
def test_dali_mixed_decoder_follows_the_rule(pixels):
    """nvJPEG's IDCT may differ from libjpeg-turbo's by a level or two; the orientation and every PNG are exact."""
    jpegs = {name: (data, reference(data)) for name, data in odd_jpegs(pixels).items()}
    pngs = odd_pngs(pixels)
    frames = {**jpegs, **pngs}
    for (name, (_, expected)), got in zip(frames.items(), dali_pixels([d for d, _ in frames.values()], gpu=True)):
        assert got.shape == expected.shape, name
        assert np.abs(got.astype(int) - expected).max() <= (0 if name in pngs else 2), name


def test_loaders_and_embed_decode_odd_frames_alike(mars_tree, copy_tree, tmp_path):
    """A MARS tree whose gallery tracklet holds rotated, grayscale, CMYK and progressive JPEGs: the DALI and the
    torch eval loaders give the same clips, with the rule's pixels (the old DALI path rotated the frame), and so
    does embed.py's read_frame on the raw files."""
    tree = copy_tree(mars_tree, "tree")
    names = (tree / "info" / "test_name.txt").read_text().split()
    by_tracklet: dict[str, list[str]] = {}
    for n in names:
        by_tracklet.setdefault(n[:11], []).append(n)
    key, members = next((k, m) for k, m in by_tracklet.items() if len(m) >= 6 and k[:4] not in ("0000", "00-1"))
    frames = [tree / "bbox_test" / n[:4] / n for n in members]
    kinds = odd_jpegs(np.asarray(Image.open(frames[0]).convert("RGB")))
    expected = []
    for frame, data in zip(frames, kinds.values()):
        frame.write_bytes(data)
        expected.append(reference(data))
    shards = tmp_path / "shards"
    shard_mars(tree, shards)
    height, width = expected[0].shape[:2]  # the frames' own size: neither loader resizes
    # paper mode with T = the tracklet's length: its one clip is all of its frames, in order
    clips = {}
    for backend in ("dali", "torch"):
        with build_eval_loader(shards, "gallery", mode="paper", clip_len=len(frames), height=height, width=width,
                               batch_size=4, backend=backend, workers=1) as loader:
            clips[backend] = {k: c for b in loader for k, c in zip(b["keys"], b["clips"])}
    assert clips["dali"].keys() == clips["torch"].keys() and key in clips["dali"]
    for k in clips["dali"]:
        torch.testing.assert_close(clips["dali"][k], clips["torch"][k], rtol=0, atol=1e-4, msg=k)
    for backend, by_key in clips.items():
        pixels = (by_key[key].float() * STD + MEAN).round().clamp(0, 255).to(torch.uint8)  # (T, 3, H, W)
        for t, (kind, want) in enumerate(zip(kinds, expected)):
            np.testing.assert_array_equal(hwc(pixels[t]), want, err_msg=f"{backend} {kind}")
    for frame, kind, want in zip(frames, kinds, expected):
        np.testing.assert_array_equal(hwc(read_frame(frame)), want, err_msg=f"read_frame {kind}")


def test_a_damaged_png_is_an_error_not_a_crash():
    """libpng inside torchvision 0.29 ends a PNG with damaged compressed data in a segmentation fault (its
    "IDAT: incorrect data check"); the rule's decoder refuses it in one line instead, naming the frame."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    damaged = bytearray(buffer.getvalue())
    damaged[len(damaged) // 2] ^= 0xFF  # inside the IDAT stream: its zlib check no longer matches
    with pytest.raises(ValueError, match="shard-x: member f.00000.png: cannot be decoded as a PNG"):
        decode_frame(bytes(damaged), "shard-x: member f.00000.png")
    assert decode_frame(buffer.getvalue()).shape == (3, 64, 32)
