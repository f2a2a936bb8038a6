"""One rule for turning a frame's bytes (JPEG or PNG) into pixels, applied by every decoder of the project.

The rule is the original STE-NVAN code's, which read frames with PIL and no EXIF handling:
- RGB, uint8, the pixels in the order they are stored: **EXIF orientation is ignored** (DALI's decoder applies
  it by default: `adjust_orientation=False` here; torchvision's `apply_exif_orientation=False`, passed explicitly;
  PIL without `exif_transpose`). A frame stored 128x256 with "rotate 90" stays 128x256 and is resized as stored.
- Grayscale is replicated into R, G and B; palette images are expanded; an alpha channel is dropped (not
  composited over a background); CMYK JPEGs are converted by libjpeg-turbo, identically in DALI, torchvision
  and PIL; progressive JPEGs decode like baseline ones.
- 16-bit PNG samples become 8-bit by round(v * 255 / 65535), which is what DALI's decoder does.

Two implementations of that one rule, tested to give the same pixels on rotated, grayscale, CMYK, progressive,
16-bit, RGBA, palette and grayscale-alpha frames (tests/test_decode.py):
- `decode_frame` (torchvision, CPU; a PNG is read by Pillow first, which refuses damaged data that would crash
  libpng inside torchvision): eval's and training's torch loader, embed.py, the ONNX recipe's
  `stenvan.read_frame`, eval's ranked-list thumbnails, `prepare verify --deep`;
- `dali_decode` (DALI, `cpu` or `mixed` on a GPU): the training and evaluation pipelines.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_16BIT = 65535


class FrameDecodeError(ValueError):
    """Bytes that are not a decodable JPEG or PNG; the message names the frame."""


def decode_frame(data, where: str = "frame") -> torch.Tensor:
    """Encoded JPEG/PNG bytes (bytes, a uint8 array or tensor) -> RGB uint8 (3, h, w) under the module's rule.
    `where` names the frame in the error (a path, a shard member)."""
    from torchvision.io import ImageReadMode, decode_image

    encoded = data if torch.is_tensor(data) else torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    _check_png(encoded, where)
    try:
        image = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=False)
    except RuntimeError as e:  # torchvision reports unreadable, truncated or unknown data as RuntimeError
        raise FrameDecodeError(f"{where}: cannot be decoded as a JPEG or PNG image ({str(e).splitlines()[0]})") \
            from None
    if image.dtype == torch.uint16:  # 16-bit PNG: round(v * 255 / 65535), exactly as DALI converts it
        image = ((image.to(torch.int32) * 255 + MAX_16BIT // 2) // MAX_16BIT).to(torch.uint8)
    return image


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(encoded: torch.Tensor, where: str) -> None:
    """A PNG whose compressed data is damaged crashes the process inside torchvision's libpng decoder (libpng's
    error handler, e.g. "IDAT: incorrect data check", ends in a segmentation fault in torchvision 0.29): let
    Pillow, which raises instead, read it first. JPEG errors are raised by torchvision itself."""
    if bytes(encoded[:8].tolist()) != PNG_SIGNATURE:
        return
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded.numpy().tobytes())) as image:
            image.load()
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError... for damaged files
        raise FrameDecodeError(f"{where}: cannot be decoded as a PNG image ({str(e).splitlines()[0]})") from None


def dali_decode(encoded, gpu: bool, hw_decoder_load: float | None = None):
    """The DALI decoder node of a pipeline, under the module's rule: (h, w, 3) uint8 RGB per sample; nvJPEG
    (`mixed`) on a GPU, libjpeg-turbo/libpng (`cpu`) without one. On a GPU, JPEG chroma is upsampled as libjpeg's
    default does (`jpeg_fancy_upsampling`; nvJPEG's own default differs from the CPU frames by a few grey levels);
    `hw_decoder_load`: the share of the batch given to the A100/H100 hardware JPEG decoder (None: DALI's default)."""
    from nvidia.dali import fn, types

    gpu_options = {"jpeg_fancy_upsampling": True}
    if hw_decoder_load is not None:
        gpu_options["hw_decoder_load"] = hw_decoder_load
    return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                             adjust_orientation=False, **(gpu_options if gpu else {}))
