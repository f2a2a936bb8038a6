"""Frames of every kind a dataset may hold, made with Pillow (and a minimal 16-bit PNG writer): EXIF-rotated,
grayscale, CMYK and progressive JPEGs; RGBA, palette, grayscale(+alpha) and 16-bit PNGs. Each comes with the
pixels the project's decoding rule must give (stenvan.decode). Not a test module."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

ORIENTATION = 0x0112  # EXIF tag


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def reference(data: bytes) -> np.ndarray:
    """The rule as the original code applied it for 8-bit data: PIL, convert("RGB"), no EXIF transposition."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def odd_jpegs(rgb: np.ndarray) -> dict[str, bytes]:
    """JPEGs of the (h, w, 3) uint8 pixels `rgb`, stored at h x w, of the kinds a decoder might treat apart."""
    image = Image.fromarray(rgb)
    rotated = []
    for orientation in (6, 3, 8):  # rotate 90 / 180 / 270 on display
        exif = image.getexif()
        exif[ORIENTATION] = orientation
        rotated.append(_encode(image, "JPEG", quality=92, exif=exif))
    return {"exif_rotate90": rotated[0], "exif_rotate180": rotated[1], "exif_rotate270": rotated[2],
            "grayscale": _encode(image.convert("L"), "JPEG", quality=92),
            "cmyk": _encode(image.convert("CMYK"), "JPEG", quality=92),
            "progressive": _encode(image, "JPEG", quality=92, progressive=True)}


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG of (h, w) gray, (h, w, 2) gray+alpha, (h, w, 3) RGB or (h, w, 4) RGBA uint16 samples."""
    h, w = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def odd_pngs(rgb: np.ndarray) -> dict[str, tuple[bytes, np.ndarray]]:
    """PNG kinds of the pixels `rgb`: name -> (bytes, the (h, w, 3) uint8 pixels the rule gives)."""
    image = Image.fromarray(rgb)
    out = {}
    for name, converted in (("rgb", image), ("rgba", image.convert("RGBA")), ("gray", image.convert("L")),
                            ("gray_alpha", image.convert("LA")), ("palette", image.convert("P", palette=Image.ADAPTIVE))):
        if name == "rgba":  # a real alpha channel, which the rule drops
            converted.putalpha(Image.fromarray((rgb[..., 0] // 2 + 60).astype(np.uint8)))
        data = _encode(converted, "PNG")
        out[name] = (data, reference(data))
    # 16-bit: samples that do not sit on multiples of 257, so that rounding matters; 8-bit = round(v * 255 / 65535)
    wide = rgb.astype(np.int64) * 257 + (np.arange(rgb.size).reshape(rgb.shape) * 37) % 257 - 128
    wide = np.clip(wide, 0, 65535).astype(np.uint16)
    eight = ((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    alpha = np.full(rgb.shape[:2] + (1,), 40000, np.uint16)
    out["rgb16"] = (png16(wide), eight)
    out["rgba16"] = (png16(np.concatenate([wide, alpha], axis=2)), eight)
    out["gray16"] = (png16(wide[..., 0]), np.repeat(eight[..., :1], 3, axis=2))
    out["gray_alpha16"] = (png16(np.stack([wide[..., 0], alpha[..., 0]], axis=2)), np.repeat(eight[..., :1], 3, axis=2))
    return out
