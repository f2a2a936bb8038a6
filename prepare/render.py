"""Procedural pedestrians for the synthetic datasets: identities, cameras and per-frame variation.

An identity is a combination of attributes (clothing colours and pattern, bag, height, hair, skin, a chest
emblem) with continuous per-identity variation, so that two identities may share every coarse attribute
and still differ in detail. A camera changes illumination (colour cast, brightness), viewpoint (mirroring,
scale, position) and background. Frames within a tracklet jitter, walk and are sometimes occluded.
Everything is derived from a numpy Generator, so the same seed gives the same pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

H, W = 256, 128  # the render canvas (MARS frame size); DukeV tracklets are resized from it
JITTER = 4  # pixels a detection box wanders from frame to frame

# Coarse clothing palette (RGB); identities pick one and perturb it, so colours are shared but not equal.
PALETTE = np.array([
    [200, 30, 30], [30, 60, 180], [30, 140, 50], [230, 210, 40], [20, 20, 20], [235, 235, 235],
    [120, 120, 120], [130, 70, 30], [240, 130, 20], [120, 40, 150], [60, 170, 190], [230, 130, 170],
], dtype=np.float32)
PATTERNS = ("plain", "hstripes", "vstripes", "checks")
BAGS = ("none", "backpack", "handbag", "shoulder")


@dataclass(frozen=True)
class Identity:
    upper: np.ndarray  # (3,) float RGB
    lower: np.ndarray
    shoes: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    pattern: str
    pattern_period: int  # pixels between stripes
    pattern_colour: np.ndarray
    bag: str
    bag_colour: np.ndarray
    height: float  # fraction of the canvas the person spans
    width: float  # body width factor
    emblem: tuple  # (y, x, size) on the torso, relative units; size 0 = none
    emblem_colour: np.ndarray


@dataclass(frozen=True)
class Camera:
    gain: np.ndarray  # (3,) per-channel illumination gain
    brightness: float
    mirror: bool  # viewpoint: the person is seen mirrored (walking the other way)
    scale: float  # viewpoint: apparent size
    background: np.ndarray  # (H, W, 3) uint8 scene behind the person


def _perturb(rng: np.random.Generator, colour: np.ndarray, amount: float) -> np.ndarray:
    return np.clip(colour + rng.normal(0, amount, 3), 0, 255).astype(np.float32)


def random_identity(rng: np.random.Generator) -> Identity:
    pick = lambda: PALETTE[rng.integers(len(PALETTE))]  # noqa: E731 - tiny local helper
    has_emblem = rng.random() < 0.5
    return Identity(
        upper=_perturb(rng, pick(), 18), lower=_perturb(rng, pick(), 18), shoes=_perturb(rng, pick(), 25),
        skin=_perturb(rng, np.array([200, 160, 130], np.float32), 25),
        hair=_perturb(rng, np.array([40, 30, 20], np.float32) if rng.random() < 0.7 else pick(), 20),
        pattern=PATTERNS[rng.integers(len(PATTERNS))], pattern_period=int(rng.integers(6, 16)),
        pattern_colour=_perturb(rng, pick(), 18),
        bag=BAGS[rng.integers(len(BAGS))], bag_colour=_perturb(rng, pick(), 18),
        height=float(rng.uniform(0.78, 0.95)), width=float(rng.uniform(0.85, 1.15)),
        emblem=(float(rng.uniform(0.2, 0.6)), float(rng.uniform(-0.5, 0.5)),
                float(rng.uniform(0.12, 0.25)) if has_emblem else 0.0),
        emblem_colour=_perturb(rng, pick(), 18),
    )


def _scene_colour(rng: np.random.Generator) -> np.ndarray:
    """Urban scenes are mostly greyish: a grey level with a moderate tint (not the saturated clothing palette)."""
    return np.clip(rng.uniform(40, 200) + rng.normal(0, 25, 3), 0, 255)


def random_camera(rng: np.random.Generator) -> Camera:
    base = _scene_colour(rng)
    ys = np.linspace(0, 1, H, dtype=np.float32)[:, None, None]
    sky = np.clip(base * (0.8 + 0.4 * ys), 0, 255)  # vertical gradient: floor lighter than walls
    background = np.broadcast_to(sky, (H, W, 3)).copy()
    for _ in range(int(rng.integers(3, 7))):  # static scene elements: doors, poles, signs
        y0, x0 = int(rng.integers(0, H - 20)), int(rng.integers(0, W - 10))
        h, w = int(rng.integers(10, 120)), int(rng.integers(5, 60))
        background[y0:y0 + h, x0:x0 + w] = _scene_colour(rng)
    return Camera(gain=rng.uniform(0.85, 1.15, 3).astype(np.float32), brightness=float(rng.uniform(0.75, 1.2)),
                  mirror=bool(rng.random() < 0.5), scale=float(rng.uniform(0.9, 1.05)),
                  background=background.astype(np.uint8))


def _body_layers(person: Identity, scale: float, leg_phase: float) -> tuple[np.ndarray, np.ndarray]:
    """Render the person on a transparent canvas: colour (H, W, 3) float32 and coverage mask (H, W) bool."""
    img = np.zeros((H, W, 3), np.float32)
    mask = np.zeros((H, W), bool)
    height = person.height * scale * H
    top = int(H - height - 4)
    cx = W // 2
    half = int(22 * person.width * scale)

    def box(y0, y1, x0, x1, colour):
        y0, y1, x0, x1 = max(int(y0), 0), min(int(y1), H), max(int(x0), 0), min(int(x1), W)
        img[y0:y1, x0:x1] = colour
        mask[y0:y1, x0:x1] = True

    head = height * 0.13
    box(top, top + head * 0.35, cx - half * 0.5, cx + half * 0.5, person.hair)
    box(top + head * 0.35, top + head, cx - half * 0.45, cx + half * 0.45, person.skin)
    torso_top, torso_bot = top + head + 2, top + height * 0.52
    box(torso_top, torso_bot, cx - half, cx + half, person.upper)
    # clothing pattern on the torso
    ys, xs = slice(int(torso_top), int(torso_bot)), slice(int(cx - half), int(cx + half))
    period = person.pattern_period
    if person.pattern in ("hstripes", "checks"):
        rows = np.arange(int(torso_top), int(torso_bot))
        img[rows[(rows // period) % 2 == 0], xs] = person.pattern_colour
    if person.pattern in ("vstripes", "checks"):
        cols = np.arange(int(cx - half), int(cx + half))
        stripe = cols[(cols // period) % 2 == 0]
        if person.pattern == "checks":  # checks: xor of the two stripe sets
            block = img[ys][:, stripe - int(cx - half)]
            img[ys, stripe] = np.where((block == person.pattern_colour).all(-1, keepdims=True), person.upper,
                                       person.pattern_colour)
        else:
            img[ys, stripe] = person.pattern_colour
    ey, ex, es = person.emblem
    if es > 0:
        y = torso_top + ey * (torso_bot - torso_top)
        x = cx + ex * half
        r = es * half
        box(y - r, y + r, x - r, x + r, person.emblem_colour)
    # arms beside the torso
    box(torso_top + 3, torso_bot + 10, cx - half - 7, cx - half, person.upper * 0.85)
    box(torso_top + 3, torso_bot + 10, cx + half, cx + half + 7, person.upper * 0.85)
    # legs: a walking cycle moves them apart and together
    legs_bot = top + height * 0.95
    spread = int(6 * np.sin(leg_phase) * scale)
    box(torso_bot, legs_bot, cx - half + 2 - spread, cx - 2 - spread // 2, person.lower)
    box(torso_bot, legs_bot, cx + 2 + spread // 2, cx + half - 2 + spread, person.lower)
    box(legs_bot, top + height, cx - half - spread, cx - 1, person.shoes)
    box(legs_bot, top + height, cx + 1, cx + half + spread, person.shoes)
    if person.bag == "backpack":
        box(torso_top + 4, torso_bot - 10, cx + half - 4, cx + half + 10, person.bag_colour)
    elif person.bag == "handbag":
        box(torso_bot, torso_bot + 28, cx - half - 16, cx - half - 3, person.bag_colour)
    elif person.bag == "shoulder":
        box(torso_top, torso_bot, cx - 3, cx + 3, person.bag_colour * 0.7)  # strap
        box(torso_bot - 20, torso_bot + 6, cx + half - 2, cx + half + 14, person.bag_colour)
    return img, mask


class TrackletRenderer:
    """Renders the frames of one tracklet: person × camera, with per-tracklet and per-frame variation."""

    POSES = 2  # leg phases of the walking cycle (legs apart, legs together): each costs a full render

    def __init__(self, person: Identity, camera: Camera, rng: np.random.Generator, size: tuple[int, int] = (H, W)):
        self.rng = rng
        self.size = size
        scale = camera.scale * float(rng.uniform(0.95, 1.05))
        gain = camera.gain * camera.brightness * rng.uniform(0.92, 1.08, 3).astype(np.float32)
        shift = int(rng.integers(-20, 21))  # the tracklet sees a different part of the scene
        background = np.roll(camera.background, shift, axis=1).astype(np.float32)
        self.poses = []
        for k in range(self.POSES):
            body, mask = _body_layers(person, scale, 2 * np.pi * (k + 0.5) / self.POSES)  # sin = +1, -1
            frame = np.where(mask[..., None], body, background) * gain
            if camera.mirror:
                frame = frame[:, ::-1]
            frame = np.clip(frame, 0, 255).astype(np.uint8)
            if size != (H, W):  # DukeV: crops come in many sizes
                frame = np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BILINEAR))
            # Padded by the jitter range so that a shifted frame is a plain crop (no np.roll per frame).
            self.poses.append(np.pad(frame, ((JITTER, JITTER), (JITTER, JITTER), (0, 0)), mode="edge")
                              .astype(np.int16))
        # A fixed noise texture, cropped at a random place per frame, costs far less than fresh noise.
        self.noise = rng.integers(-6, 7, (size[0] + 16, size[1] + 16, 3), dtype=np.int16)
        self.phase = int(rng.integers(self.POSES))

    def frame(self, index: int) -> np.ndarray:
        """The `index`-th frame: (h, w, 3) uint8."""
        rng = self.rng
        h, w = self.size
        base = self.poses[(self.phase + index) % self.POSES]
        dy, dx = rng.integers(0, 2 * JITTER + 1, 2)  # detector jitter
        oy, ox = rng.integers(0, 16, 2)
        frame = base[dy:dy + h, dx:dx + w] + self.noise[oy:oy + h, ox:ox + w]
        # Flicker: brightness x0.9..1.1 in 1/64 steps, integer maths (max 261 * 70 fits int16).
        frame *= np.int16(rng.integers(58, 71))
        frame >>= 6
        if rng.random() < 0.1:  # occlusion by another object or person
            oh, ow = int(rng.integers(h // 5, h // 2)), int(rng.integers(w // 4, w))
            y0 = int(rng.integers(0, h - oh))
            x0 = 0 if rng.random() < 0.5 else w - ow
            frame[y0:y0 + oh, x0:x0 + ow] = rng.integers(0, 256, 3)
        return np.clip(frame, 0, 255, out=frame).astype(np.uint8)


def encode_png(frame: np.ndarray) -> bytes:
    """Lossless PNG (iLIDS-VID and PRID-2011 ship PNG frames); Pillow's zlib output is deterministic."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "PNG")
    return buf.getvalue()


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
