"""Turning a `ClipSpec` into pixels without DALI (the torch loader), plus the pieces both loaders share."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # the colour random erasing fills with (124, 116, 104)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def frame_size(data) -> tuple[int, int] | None:
    """(height, width) of a JPEG (its SOF header) or a PNG (its IHDR chunk), None if neither says (the loaders
    then resize, to be safe)."""
    buf = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    if len(buf) >= 24 and bytes(buf[:8]) == PNG_SIGNATURE and bytes(buf[12:16]) == b"IHDR":
        return int.from_bytes(buf[20:24], "big"), int.from_bytes(buf[16:20], "big")
    return jpeg_size(buf)


class WorkerFailure:
    """A user error of a DataLoader worker (a shard changed, a frame that does not decode) travelling as data:
    raised in the worker, it would reach the main process wrapped in the worker's traceback text."""

    def __init__(self, message: str):
        self.message = message

    @staticmethod
    def first(items) -> "WorkerFailure | None":
        """The first failure among a batch's items (collate functions return it instead of a batch)."""
        return next((item for item in items if isinstance(item, WorkerFailure)), None)


def jpeg_size(data) -> tuple[int, int] | None:
    """(height, width) from a JPEG's SOF header, or None if there is none (DALI then resizes, to be safe)."""
    buf = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    n, i = len(buf), 2
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    while i + 9 < n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = (buf[i + 2] << 8) | buf[i + 3]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            return (buf[i + 5] << 8) | buf[i + 6], (buf[i + 7] << 8) | buf[i + 8]
        i += 2 + length
    return None


def normalize(pixels: torch.Tensor, dtype: torch.dtype, channel_dim: int = -3) -> torch.Tensor:
    """uint8 pixels -> (x - 255·mean) / (255·std) in `dtype`, computed in float32 as DALI does; the colour
    channels are at `channel_dim` (-3: (..., 3, H, W); -1: (..., H, W, 3)). Keeps the memory layout."""
    shape = (3,) + (1,) * (-channel_dim - 1)
    # Made on the CPU and sent without blocking: torch.tensor(..., device="cuda") would synchronise the host.
    mean = (torch.tensor(IMAGENET_MEAN).view(shape) * 255).to(pixels.device, non_blocking=True)
    std = (torch.tensor(IMAGENET_STD).view(shape) * 255).to(pixels.device, non_blocking=True)
    return ((pixels.float() - mean) / std).to(dtype)


def as_clips(frames: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, 3) frames, contiguous -> (B, T, 3, H, W) clips, a view: no copy, and flattening it to
    (B·T, 3, H, W) (what the model does first) gives a channels_last tensor, again without a copy."""
    return frames.permute(0, 1, 4, 2, 3)


def resize_frame(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (3, h, w) -> (3, H, W), antialiased bilinear; frames already H×W are returned untouched (the torch
    loader, embed.py and the ONNX recipe all resize with this)."""
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    if tuple(image.shape[1:]) == (height, width):
        return image
    return resize(image, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)


def load_clip(table, store, spec, height: int, width: int) -> torch.Tensor:
    """Decode, resize (only frames not already H×W), crop, erase and flip one clip: uint8 (T, 3, H, W)."""
    from stenvan.decode import decode_frame

    frames = []
    for location in table.frame_locations(spec.tracklet, spec.frames):
        img = decode_frame(store.read(*location), f"{store.paths[location[0]]}: member {location[3]}")  # (3, h, w)
        frames.append(resize_frame(img, height, width))
    clip = torch.stack(frames)  # (T, 3, H, W)
    return augment_clip(clip, spec)


def augment_clip(clip: torch.Tensor, spec) -> torch.Tensor:
    """The clip-level augmentation of `spec` on a uint8 (T, 3, H, W) clip, identical for every frame."""
    height, width = clip.shape[-2:]
    y, x = spec.crop
    if (y, x) != (0, 0):  # the H×W window at (y, x) of the frame padded with black
        out = torch.zeros_like(clip)
        sy, dy, h = max(y, 0), max(-y, 0), height - abs(y)
        sx, dx, w = max(x, 0), max(-x, 0), width - abs(x)
        if h > 0 and w > 0:
            out[..., dy:dy + h, dx:dx + w] = clip[..., sy:sy + h, sx:sx + w]
        clip = out
    top, left, h, w = spec.erase
    if h and w:
        clip = clip.clone()
        clip[..., top:top + h, left:left + w] = torch.tensor(MEAN_PIXEL, dtype=clip.dtype).view(3, 1, 1)
    if spec.flip:
        clip = clip.flip(-1)
    return clip
