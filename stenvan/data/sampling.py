"""What to load: P×K identity batches, the frames of each clip, and each clip's augmentation parameters.

Every random choice is a pure function of (seed, epoch, step, global position in the batch), drawn from
`numpy.random.default_rng([seed, stream, epoch, step, position])`, so any step of any epoch can be recomputed
on its own: resuming at step s gives exactly the batches s.. of the uninterrupted epoch, and the ranks of a
distributed run together load exactly the batch a single process would (rank r of W holds the clips at
positions r, r + W, r + 2W, ... of it: a cross-section of its identities).
The loaders (DALI and torch) only execute the `ClipSpec`s made here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Random streams, one per kind of choice, so that adding a choice never shifts another.
_IDENTITIES, _TRACKLETS, _CLIP = 0, 1, 2

# Random erasing (Zhong et al. 2020, the torchreid/fast-reid defaults): area fraction, aspect ratio, tries.
ERASE_AREA = (0.02, 0.4)
ERASE_MIN_ASPECT = 0.3
ERASE_TRIES = 100


# --------------------------------------------------------------------------------------------------------------
# Frame indices of a clip (design §4, as the original `utils.py`: the frame list is padded with the last frame)
# --------------------------------------------------------------------------------------------------------------

def _chunks(num_frames: int, clip_len: int) -> tuple[np.ndarray, int]:
    """The padded frame list and the chunk length I: I = ceil(F/T), padded to I·T; I = 1, padded to T if F < T."""
    if num_frames < 1 or clip_len < 1:
        raise ValueError(f"need num_frames >= 1 and clip_len >= 1, got {num_frames} and {clip_len}")
    interval = 1 if num_frames < clip_len else math.ceil(num_frames / clip_len)
    strip = np.minimum(np.arange(interval * clip_len), num_frames - 1)  # repeats the last frame
    return strip, interval


def restricted_random_indices(num_frames: int, clip_len: int, rng: np.random.Generator) -> list[int]:
    """Training clip: one frame drawn uniformly from each of the T chunks of the padded frame list, in order.

    Always draws exactly T integers from `rng` (even when F < T and every chunk holds one frame), so the
    draws that follow do not depend on the tracklet's length.
    """
    strip, interval = _chunks(num_frames, clip_len)
    picks = rng.integers(0, interval, size=clip_len)
    return strip[np.arange(clip_len) * interval + picks].tolist()


def first_of_chunk_indices(num_frames: int, clip_len: int) -> list[int]:
    """Test clip (`paper` mode): the first frame of each of the T chunks of the padded frame list."""
    strip, interval = _chunks(num_frames, clip_len)
    return strip[np.arange(clip_len) * interval].tolist()


def dense_chunks(num_frames: int, clip_len: int) -> list[list[int]]:
    """Test clips (`dense` mode): every frame of the tracklet once, in temporal order, cut so that every frame
    weighs the same in the tracklet's feature when each clip's feature is weighted by its number of distinct
    frames (the eval loader's `real_frames`; `evaluate.extract_split` does so).

    Consecutive chunks of T frames; the rest (F mod T frames, all F when F < T) is cut greedily into groups
    whose sizes divide T (T = 8: 4, 2, 1), each frame of a group repeated T/size times in place, e.g. F = 11,
    T = 4: [0 1 2 3] [4 5 6 7] [8 8 9 9] [10 10 10 10], weights 4, 4, 2, 1. A group is its frames at a lower
    frame rate, and no frame stands in for others: for a model whose clip feature is the mean of its frames'
    features, the dense feature is exactly the mean over the tracklet's frames. (Padding the last chunk with
    copies of the last frame, as the original did, gave that frame half the feature for F = 9, T = 8.)
    Cost: for T = 8, at most 2 clips more per tracklet than a padded last chunk.
    """
    if num_frames < 1 or clip_len < 1:
        raise ValueError(f"need num_frames >= 1 and clip_len >= 1, got {num_frames} and {clip_len}")
    full = num_frames // clip_len
    clips = [list(range(c * clip_len, (c + 1) * clip_len)) for c in range(full)]
    start, left = full * clip_len, num_frames - full * clip_len
    sizes = [d for d in range(clip_len, 0, -1) if clip_len % d == 0]  # divisors of T, largest first
    while left:
        size = next(d for d in sizes if d <= left)
        clips.append([start + i // (clip_len // size) for i in range(clip_len)])  # each frame T/size times
        start, left = start + size, left - size
    return clips


# --------------------------------------------------------------------------------------------------------------
# P × K identity sampler
# --------------------------------------------------------------------------------------------------------------

class IdentitySampler:
    """P identities × K tracklets per identity (drawn with replacement), `steps_per_epoch` whole batches an epoch.

    The identities of an epoch follow one global permutation seeded by (seed, epoch); batch `step` takes the next
    P of them. An epoch longer than ⌊#ids / P⌋ batches chains further permutations (seeded by (seed, epoch, j)),
    so a batch that straddles two of them may hold an identity twice. The global batch lists its P·K clips
    identity by identity (K in a row); rank r of W takes the cross-section r, r + W, r + 2W, ... of it, so the
    ranks' shares are disjoint, their union is the single-process batch, every rank runs the same number of
    steps, and each share holds min(P, P·K/W) identities: with the paper's 8 × 4 on 8 GPUs, 4 identities of one
    clip each rather than one identity of 4 clips, whose per-rank BatchNorm statistics would be that identity's
    own (the neck BN would subtract what cross-entropy needs).
    """

    def __init__(self, labels_per_tracklet, P: int, K: int, seed: int, rank: int = 0, world_size: int = 1,
                 batches_per_epoch: int | None = None):
        labels = np.asarray(labels_per_tracklet, dtype=np.int64)
        if P < 1 or K < 1:
            raise ValueError(f"P and K must be positive, got P={P}, K={K}")
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not valid for world_size={world_size}")
        if (P * K) % world_size:
            raise ValueError(f"a batch of P·K = {P}·{K} = {P * K} clips cannot be split evenly over world_size="
                             f"{world_size} ranks; choose ids_per_batch and tracklets_per_id with a product "
                             f"divisible by {world_size}")
        self.ids = np.unique(labels[labels >= 0])  # identity labels, ascending
        self.num_ids = len(self.ids)
        if self.num_ids < P:
            raise ValueError(f"P={P} identities per batch but the split has only {self.num_ids}")
        self.members = [np.flatnonzero(labels == i) for i in self.ids]  # tracklet indices of each identity
        self.P, self.K, self.seed, self.rank, self.world_size = P, K, int(seed), rank, world_size
        self.steps_per_epoch = self.num_ids // P if batches_per_epoch is None else int(batches_per_epoch)
        if self.steps_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be positive, got {batches_per_epoch}")
        self.batch_size = P * K // world_size  # clips per rank and step
        # Identity slots in this rank's share: all P when W < K, else one clip each of P·K/W identities.
        self.ids_per_rank = len({self.global_position(i) // K for i in range(self.batch_size)})

    def _permutation(self, epoch: int, j: int) -> np.ndarray:
        return _permutation(self.seed, epoch, j, self.num_ids)

    def identity(self, epoch: int, step: int, p: int) -> int:
        """Identity (index into `ids`, = the train label) of slot p (0..P-1) of the global batch `step`."""
        self._check(epoch, step)
        q = step * self.P + p
        return int(self._permutation(epoch, q // self.num_ids)[q % self.num_ids])

    def identities(self, epoch: int, step: int) -> list[int]:
        """The P identities of the global batch `step` of `epoch`, in slot order."""
        return [self.identity(epoch, step, p) for p in range(self.P)]

    def slot(self, epoch: int, step: int, p: int) -> list[int]:
        """The K tracklets of identity slot p (0..P-1) of the global batch."""
        rng = np.random.default_rng([self.seed, _TRACKLETS, epoch, step, p])
        return rng.choice(self.members[self.identity(epoch, step, p)], size=self.K, replace=True).tolist()

    def tracklet_at(self, epoch: int, step: int, i: int) -> int:
        """This rank's sample i of the step (what `batch(epoch, step)[i]` holds), computed on its own."""
        g = self.global_position(i)
        return self.slot(epoch, step, g // self.K)[g % self.K]

    def batch(self, epoch: int, step: int) -> list[int]:
        """This rank's P·K/world_size tracklet indices: positions rank, rank + W, ... of the global batch."""
        positions = [self.global_position(i) for i in range(self.batch_size)]
        slots = {p: self.slot(epoch, step, p) for p in sorted({g // self.K for g in positions})}
        return [slots[g // self.K][g % self.K] for g in positions]

    def global_position(self, i: int) -> int:
        """Position in the global batch of this rank's sample i."""
        return self.rank + i * self.world_size

    def _check(self, epoch: int, step: int) -> None:
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"epoch {epoch}, step {step}: steps run 0..{self.steps_per_epoch - 1}")


@lru_cache(maxsize=64)
def _permutation(seed: int, epoch: int, j: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, _IDENTITIES, epoch, j]).permutation(n)


# --------------------------------------------------------------------------------------------------------------
# Clip specifications: what a loader executes
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipSpec:
    """One clip to load: tracklet, frame indices, and augmentation in output-pixel coordinates.

    The loader resizes every frame to (H, W), crops the H×W window at `crop` = (top, left) of the frame padded
    with black (anchors may be negative), fills `erase` = (top, left, height, width) with the ImageNet mean
    colour, then mirrors the clip horizontally if `flip`; the same for every frame of the clip.
    """
    tracklet: int
    frames: tuple[int, ...]
    flip: bool = False
    crop: tuple[int, int] = (0, 0)
    erase: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True)
class Augment:
    """Clip-level augmentation options (the paper: flip_p 0.5, no pad-and-crop, no erasing)."""
    height: int
    width: int
    flip_p: float = 0.5
    pad: int = 0  # pad each side by this many pixels, then crop H×W at a random place (0 = off)
    erase_p: float = 0.0  # probability of random erasing (0 = off)

    def __post_init__(self):
        if not 0.0 <= self.flip_p <= 1.0 or not 0.0 <= self.erase_p <= 1.0:
            raise ValueError(f"flip_p and erase_p are probabilities, got {self.flip_p} and {self.erase_p}")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")


def draw_augmentation(aug: Augment, rng: np.random.Generator) -> tuple[bool, tuple, tuple]:
    """(flip, crop anchor, erase box) for one clip; a fixed number of draws per enabled option."""
    flip = bool(rng.random() < aug.flip_p)
    crop = (0, 0)
    if aug.pad:
        y, x = rng.integers(-aug.pad, aug.pad + 1, size=2)
        crop = (int(y), int(x))
    erase = (0, 0, 0, 0)
    if aug.erase_p:
        if rng.random() < aug.erase_p:
            h_, w_ = aug.height, aug.width
            for _ in range(ERASE_TRIES):
                area = rng.uniform(*ERASE_AREA) * h_ * w_
                aspect = rng.uniform(ERASE_MIN_ASPECT, 1 / ERASE_MIN_ASPECT)
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if 0 < h < h_ and 0 < w < w_:
                    erase = (int(rng.integers(0, h_ - h + 1)), int(rng.integers(0, w_ - w + 1)), h, w)
                    break
    return flip, crop, erase


class TrainPlan:
    """The clips of every training step: sampler + restricted random sampling + augmentation (picklable)."""

    def __init__(self, sampler: IdentitySampler, num_frames, clip_len: int, aug: Augment):
        self.sampler, self.clip_len, self.aug = sampler, clip_len, aug
        self.num_frames = np.asarray(num_frames, dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def clip(self, epoch: int, step: int, tracklet: int, position: int) -> ClipSpec:
        """Clip of `tracklet` at global batch `position`: frames first, then the augmentation, one generator."""
        rng = np.random.default_rng([self.sampler.seed, _CLIP, epoch, step, position])
        frames = restricted_random_indices(int(self.num_frames[tracklet]), self.clip_len, rng)
        flip, crop, erase = draw_augmentation(self.aug, rng)
        return ClipSpec(tracklet, tuple(frames), flip, crop, erase)

    def sample(self, epoch: int, step: int, i: int) -> ClipSpec:
        """This rank's clip i of the step, computed on its own (what a stateless DALI callback needs)."""
        return self.clip(epoch, step, self.sampler.tracklet_at(epoch, step, i), self.sampler.global_position(i))

    def batch(self, epoch: int, step: int) -> list[ClipSpec]:
        """This rank's clips of the step."""
        return [self.clip(epoch, step, t, self.sampler.global_position(i))
                for i, t in enumerate(self.sampler.batch(epoch, step))]


def eval_clips(num_frames, clip_len: int, mode: str) -> list[ClipSpec]:
    """Every tracklet in order: one clip (`paper`) or the clips of `dense_chunks` (`dense`) each; no augmentation."""
    if mode not in ("paper", "dense"):
        raise ValueError(f"mode={mode!r} is not valid; use 'paper' or 'dense'")
    out = []
    for i, n in enumerate(np.asarray(num_frames).tolist()):
        if mode == "paper":
            out.append(ClipSpec(i, tuple(first_of_chunk_indices(n, clip_len))))
        else:
            out.extend(ClipSpec(i, tuple(c)) for c in dense_chunks(n, clip_len))
    return out
