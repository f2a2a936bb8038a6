"""Retrieval features for any tracklets with a trained model: folders of frames, frames in memory, prepared splits.

    from stenvan import Embedder
    embedder = Embedder("runs/ste_mars/last.pt")           # or Embedder("STE_NVAN.pth", original_arch="ste_nvan")
    feature = embedder.embed(frames)                       # (F, H, W, 3) uint8 RGB array or list of image paths
    result = embedder.embed_folder("my_tracklets/")        # one subfolder per tracklet -> keys, features, counts

The feature is exactly eval.py's (tested against `eval.py --loader torch`): the same input contract and the same
code from frames to feature:
- frames in temporal order (a folder's JPEG/PNG files sorted by name), decoded to RGB uint8 by the project's one
  rule (stenvan.decode: EXIF orientation ignored, as eval's loaders do);
- each frame resized to the model's H×W with antialiased bilinear resampling (frames already H×W untouched);
- normalised with the ImageNet mean/std;
- clips chosen as in eval (stenvan.data.sampling.eval_clips): `paper` = one clip of T frames, the first of each
  of T chunks; `dense` = every frame, in chunks of T;
- the model's post-BN feature (2048) per clip, averaged per tracklet by
  stenvan.evaluation.evaluate.features_per_tracklet.
eval.py's default DALI loader decodes by the same rule and resizes with its own kernel (within about one grey level).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from stenvan.data.clips import WorkerFailure, as_clips, normalize, resize_frame
from stenvan.data.sampling import eval_clips

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class InputError(ValueError):
    """Tracklets that cannot be embedded: the message names the file or folder and what to do."""


@dataclass(frozen=True)
class Embedded:
    """Features of a set of tracklets, row i for keys[i]; pids/camids only for prepared splits (labelled)."""
    keys: list[str]
    features: np.ndarray  # (N, 2048) float32, eval.py's retrieval feature
    num_frames: np.ndarray  # (N,) int64
    pids: np.ndarray | None = None  # (N,) int64: identity (0 distractor, -1 junk)
    camids: np.ndarray | None = None  # (N,) int64
    thumbnail: Callable[[int], np.ndarray] | None = None  # index -> (64, 32, 3) uint8 first frame, for pictures


def list_tracklets(root: str | os.PathLike) -> list[tuple[str, list[Path]]]:
    """(key, frame paths sorted by file name) for every subfolder of `root`, in name order. An entry that cannot
    be examined (a symlink to a missing target) or a frame that is not a regular file is an InputError naming it,
    never dropped (stenvan.frame_files)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; pass a folder that holds one subfolder of frames per tracklet")
    entries = _listing(root)
    broken = next((e for e in entries if e.kind == "broken"), None)
    if broken is not None:
        raise InputError(f"{broken.problem}; restore it or move it out of {root}")
    folders = [Path(e.path) for e in entries if e.kind == "folder"]
    if not folders:
        hint = " (it holds frames: put each tracklet's frames in a subfolder)" if _frames_in(root) else ""
        raise InputError(f"{root}: no tracklet folders{hint}; pass a folder with one subfolder per tracklet")
    out = []
    for folder in folders:
        frames = _frames_in(folder)
        if not frames:
            raise InputError(f"{folder}: no JPEG or PNG frames (*.jpg, *.jpeg, *.png); remove the folder or add "
                             "its frames")
        out.append((folder.name, frames))
    return out


def _listing(folder: Path):
    from stenvan.frame_files import list_entries

    try:
        return list_entries(str(folder))
    except OSError as e:
        raise InputError(f"{folder}: cannot be listed ({e.strerror})") from None


def _frames_in(folder: Path) -> list[Path]:
    """The frames of a tracklet folder, in plain name order (as MARS/DukeV names and the shards: zero-pad frame
    numbers in your own file names). A frame name that is not a regular file is an InputError."""
    frames = [e for e in _listing(folder) if e.name.lower().endswith(IMAGE_SUFFIXES)]
    bad = next((e for e in frames if e.kind != "file"), None)
    if bad is not None:
        problem = bad.problem or f"{bad.path}: is a folder, not a frame file"
        raise InputError(f"{problem}; replace it with the frame or move it out of {folder}")
    return [Path(e.path) for e in frames]


def read_frame(path: str | os.PathLike) -> torch.Tensor:
    """A JPEG or PNG file as RGB uint8 (3, h, w), under the project's one decoding rule (stenvan.decode:
    EXIF orientation ignored, alpha dropped, 16-bit scaled to 8), read as a regular file without blocking."""
    from stenvan.decode import FrameDecodeError, decode_frame
    from stenvan.frame_files import FrameFileError, read_frame_bytes

    try:
        return decode_frame(read_frame_bytes(str(path)), str(path))
    except (FrameFileError, FrameDecodeError) as e:
        raise InputError(f"{e}; replace or remove the file") from None


def _as_frames(frames) -> np.ndarray | list[Path]:
    """Check one tracklet given as a (F, H, W, 3) uint8 RGB array or a list of image paths."""
    if isinstance(frames, (str, os.PathLike)):
        raise InputError(f"{frames}: pass a list of frame paths or an array, not one path (embed_folder takes "
                         "a folder of tracklets)")
    if isinstance(frames, np.ndarray) or torch.is_tensor(frames):
        arr = np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or len(arr) == 0:
            raise InputError(f"frames must be a (F, H, W, 3) uint8 RGB array with F >= 1, got {arr.shape} "
                             f"{arr.dtype}")
        return arr
    paths = [Path(p) for p in frames]
    if not paths:
        raise InputError("a tracklet needs at least one frame, got an empty list")
    from stenvan.frame_files import FrameFileError, stat_frame

    for p in paths:
        try:
            stat_frame(str(p))
        except FrameFileError as e:
            raise InputError(f"{e}; pass the paths of frame files") from None
    return paths


class _ClipFrames(torch.utils.data.Dataset):
    """dataset[ClipSpec] -> (uint8 clip (T, 3, H, W), tracklet index): frames decoded or taken, then resized."""

    def __init__(self, tracklets: list, height: int, width: int):
        self.tracklets, self.height, self.width = tracklets, height, width

    def __getitem__(self, spec):
        source = self.tracklets[spec.tracklet]
        frames = []
        for f in spec.frames:
            try:
                frame = torch.from_numpy(source[f]).permute(2, 0, 1) if isinstance(source, np.ndarray) \
                    else read_frame(source[f])  # (3, h, w)
            except InputError as e:  # from a worker process: one line, not the worker's traceback
                return WorkerFailure(str(e))
            frames.append(resize_frame(frame, self.height, self.width))
        return torch.stack(frames), spec.tracklet  # (T, 3, H, W)

    def __len__(self):  # indexed by ClipSpec through a batch sampler
        raise TypeError("_ClipFrames is indexed by ClipSpec through a batch sampler")


def _collate(items):
    failed = WorkerFailure.first(items)
    if failed is not None:
        return failed
    clips, tracklets = zip(*items)
    return torch.stack(clips), torch.tensor(tracklets, dtype=torch.int64)


def _checked(loader):
    """The DataLoader's batches; a frame that failed in a worker raises here as one InputError line."""
    for batch in loader:
        if isinstance(batch, WorkerFailure):
            raise InputError(batch.message)
        yield batch


def _worker_init(_):
    torch.set_num_threads(1)  # one decode per worker; the parallelism is the workers


class Embedder:
    """A model loaded for inference and the eval preprocessing; see the module docstring.

    checkpoint: a stenvan checkpoint (train.py) or, with original_arch, one released by the original project.
    clip_len/height/width default to the checkpoint's (8, 256, 128 for originals); mode is "paper" or "dense".
    """

    def __init__(self, checkpoint: str | os.PathLike, *, original_arch: str | None = None, mode: str = "paper",
                 device: str = "auto", precision: str = "auto", batch_size: int = 32, workers: int = 2,
                 clip_len: int | None = None, height: int | None = None, width: int | None = None):
        from stenvan.amp import resolve_precision
        from stenvan.distributed import describe
        from stenvan.evaluation.evaluate import load_model_for_eval

        if mode not in ("paper", "dense"):
            raise ValueError(f"mode={mode!r} is not valid; use 'paper' or 'dense'")
        if batch_size < 1 or workers < 0:
            raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size} and {workers}")
        self.device = describe(device).device
        self.precision = resolve_precision(precision, self.device)
        model, settings = load_model_for_eval(str(checkpoint), original_arch)
        settings.update({k: v for k, v in (("clip_len", clip_len), ("height", height), ("width", width))
                         if v is not None})
        model.check_clip_length(settings["clip_len"])  # e.g. STE-NVAN needs T multiple of 4: fail before any work
        if settings["height"] < 16 or settings["width"] < 16:
            raise ValueError(f"height and width must be at least 16, got {settings['height']}x{settings['width']}")
        self.model = model.to(self.device).eval()
        self.settings = settings
        self.mode, self.batch_size, self.workers = mode, batch_size, workers
        self.clip_len, self.height, self.width = settings["clip_len"], settings["height"], settings["width"]

    def embed(self, frames) -> np.ndarray:
        """The feature (2048,) float32 of one tracklet: a (F, H, W, 3) uint8 RGB array or a list of image paths."""
        return self.embed_many([frames]).features[0]

    def embed_many(self, tracklets: Sequence, keys: Sequence[str] | None = None, progress: bool = False) -> Embedded:
        """Features of several tracklets (each an array or a list of paths), batched across tracklets."""
        from tqdm import tqdm

        from stenvan.evaluation.evaluate import features_per_tracklet

        sources = [_as_frames(t) for t in tracklets]
        num_frames = np.array([len(s) for s in sources], dtype=np.int64)
        keys = [str(i) for i in range(len(sources))] if keys is None else list(keys)
        if not sources:
            return Embedded(keys, np.zeros((0, 2048), np.float32), num_frames)
        specs = eval_clips(num_frames, self.clip_len, self.mode)  # the clips eval.py would take
        workers = self.workers if all(isinstance(s, list) for s in sources) else 0  # arrays stay in this process
        spec_batches = [specs[i:i + self.batch_size] for i in range(0, len(specs), self.batch_size)]
        loader = torch.utils.data.DataLoader(
            _ClipFrames(sources, self.height, self.width), batch_sampler=spec_batches,
            num_workers=workers, collate_fn=_collate, pin_memory=self.device.type == "cuda",
            worker_init_fn=_worker_init if workers else None)
        # A clip weighs as many distinct frames as it holds, as in eval (the DataLoader keeps batch order).
        # Clips in the eval loader's memory layout (channels_last, stenvan.data.clips.as_clips): convolutions
        # take other kernels for another layout, and the features must equal eval's.
        batches = ({"clips": as_clips(normalize(clips.to(self.device, non_blocking=True), torch.float32)
                                      .permute(0, 1, 3, 4, 2).contiguous()), "tracklet": index,
                    "real_frames": torch.tensor([len(set(spec.frames)) for spec in batch])}
                   for (clips, index), batch in zip(_checked(loader), spec_batches))
        with tqdm(total=len(sources), desc="embed", unit="tracklet", disable=None if progress else True) as bar:
            features, _ = features_per_tracklet(self.model, batches, len(sources), device=self.device,
                                                precision=self.precision, bar=bar)
        first = [s[:1] if isinstance(s, np.ndarray) else s[0] for s in sources]
        return Embedded(keys, features, num_frames, thumbnail=lambda i: _thumbnail(first[i]))

    def embed_folder(self, root: str | os.PathLike, progress: bool = True) -> Embedded:
        """Every tracklet folder under `root` (key = folder name), in name order."""
        tracklets = list_tracklets(root)
        return self.embed_many([paths for _, paths in tracklets], keys=[k for k, _ in tracklets], progress=progress)

    def embed_split(self, shard_dir: str | os.PathLike, split: str, loader: str = "dali",
                    progress: bool = True) -> Embedded:
        """A split of prepared shards through eval.py's own extraction (stenvan.evaluation.evaluate.extract_split)."""
        from stenvan.data import TrackletTable
        from stenvan.evaluation.evaluate import extract_split, thumbnails
        from stenvan.shards import load_manifest, split_names

        manifest = load_manifest(shard_dir)
        if split not in split_names(manifest["dataset"]):
            raise InputError(f"split={split!r} is not valid for {manifest['dataset']}; use one of "
                             f"{', '.join(split_names(manifest['dataset']))}")
        table = TrackletTable.from_dir(shard_dir, split, manifest=manifest)
        features, _ = extract_split(self.model, str(shard_dir), split, mode=self.mode, clip_len=self.clip_len,
                                    height=self.height, width=self.width, device=self.device,
                                    precision=self.precision, loader=loader, workers=self.workers,
                                    batch_size=self.batch_size, progress=progress, table=table)
        thumbs = thumbnails({split: table}, [(split, i) for i in range(len(table))])
        return Embedded(table.keys, features, table.num_frames.astype(np.int64), table.pids, table.camids,
                        thumbnail=thumbs)


def _thumbnail(first) -> np.ndarray:
    """A tracklet's first frame as a 64x32 RGB uint8 thumbnail (eval's ranked-list size)."""
    frame = torch.from_numpy(first[0]).permute(2, 0, 1) if isinstance(first, np.ndarray) else read_frame(first)
    return resize_frame(frame, 64, 32).permute(1, 2, 0).numpy()
