"""Training-loader throughput: the DALI loader, the torch loader and the original project's approach.

    python -m benchmarks.loader --data shards/mars --raw /data/MARS [--backend dali torch original]
        [--device cpu|cuda] [--batches 20] [--repeats 3] [--workers 2]
        [--height 256 --width 128 --clip-len 8 --P 8 --K 4] [--model ste_nvan] [--hw-decoder-load 0 1]

Every variant loads the same clips (same P×K sampler, same restricted random frame indices, same flips) with
the same batch size and worker count, and delivers normalised (B, T, 3, H, W) float32 clips on `--device`:
- `dali`: stenvan's default loader, frames read by offset from the shards; decode on the CPU (`--device cpu`)
  or `mixed` (nvJPEG, `--device cuda`; DALI's default share of the frames, 0.65, goes to the GPU's hardware JPEG
  decoder where it has one: A100, H100). `--hw-decoder-load X ...` (cuda) adds a `dali-mixed-hwX` variant per
  share, e.g. 0 (all frames on the CUDA cores) and 1 (all on the hardware decoder).
- `torch`: stenvan's torch loader (DataLoader + torchvision.io.decode_image, libjpeg for JPEG, from the shards).
- `original`: the STE-NVAN project's approach: a DataLoader whose dataset opens one JPEG file per frame from the
  raw dataset folders with PIL, `Resize((H, W))` + `ToTensor` + `Normalize` per frame, stacks T frames, flips.
One full epoch of `--batches` batches warms each variant up (workers started, caches filled); then `--repeats`
epochs are timed. With `--model ARCH` every batch also runs a forward/backward/Adam step of
`stenvan.build_model(ARCH)` and the share of the step time spent waiting for data is reported.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import append_results, device_name, print_table, summarize, versions
from stenvan.data import build_train_loader
from stenvan.data.loader import SpecBatches
from stenvan.data.sampling import Augment, IdentitySampler, TrainPlan
from stenvan.data.table import TrackletTable

VARIANTS = ("dali", "torch", "original")


class OriginalDataset(torch.utils.data.Dataset):
    """The original project's per-clip work: PIL opens each frame file, torchvision transforms per frame."""

    def __init__(self, paths: list[list[str]], height: int, width: int):
        import torchvision.transforms as T

        self.paths = paths  # per tracklet, its frame files in order
        self.transform = T.Compose([T.Resize((height, width)), T.ToTensor(),
                                    T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])

    def __getitem__(self, spec):
        from PIL import Image

        files = self.paths[spec.tracklet]
        clip = torch.stack([self.transform(Image.open(files[f])) for f in spec.frames])  # (T, 3, H, W)
        return (clip.flip(-1) if spec.flip else clip), spec.tracklet

    def __len__(self):
        return len(self.paths)


class OriginalLoader:
    """Same sampler and clip specs as stenvan's loaders, the original's data path."""

    def __init__(self, table: TrackletTable, plan: TrainPlan, raw: Path, height: int, width: int, workers: int,
                 device: torch.device):
        store = table.store()
        paths = []
        for i in range(len(table)):
            meta = table.metadata(i, store)
            paths.append([str(raw / meta["source"] / name) for name in meta["frames"]])
        self.plan, self.device, self.table = plan, device, table
        self.steps_per_epoch, self.num_classes = plan.steps_per_epoch, table.num_ids
        self._batches = SpecBatches()
        self._loader = torch.utils.data.DataLoader(
            OriginalDataset(paths, height, width), batch_sampler=self._batches, num_workers=workers,
            collate_fn=lambda items: (torch.stack([c for c, _ in items]), torch.tensor([t for _, t in items])),
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            worker_init_fn=(lambda _: torch.set_num_threads(1)) if workers else None)

    def epoch(self, epoch: int, start_step: int = 0):
        plan = self.plan
        self._batches.batches = lambda: (plan.batch(epoch, s) for s in range(start_step, plan.steps_per_epoch))
        self._batches.count = plan.steps_per_epoch - start_step
        labels = torch.from_numpy(self.table.labels)
        for clips, tracklets in self._loader:
            yield {"clips": clips.to(self.device, non_blocking=True), "labels": labels[tracklets].to(self.device)}

    def close(self):
        self._loader = None


def make_loader(variant: str, args, device: torch.device):
    common = dict(P=args.P, K=args.K, clip_len=args.clip_len, height=args.height, width=args.width, seed=0,
                  device=device, workers=args.workers, batches_per_epoch=args.batches)
    if variant in ("dali", "torch"):
        return build_train_loader(args.data, backend=variant, **common)
    if variant.startswith("dali-mixed-hw"):  # the hardware JPEG decoder's share of the frames
        return build_train_loader(args.data, backend="dali", hw_decoder_load=float(variant[13:]), **common)
    table = TrackletTable.from_dir(args.data, "train")
    sampler = IdentitySampler(table.labels, args.P, args.K, 0, batches_per_epoch=args.batches)
    plan = TrainPlan(sampler, table.num_frames, args.clip_len, Augment(args.height, args.width))
    return OriginalLoader(table, plan, args.raw, args.height, args.width, args.workers, device)


def make_step(arch: str | None, num_classes: int, device: torch.device):
    """A training step of the model on a batch (None: no model, the loader alone)."""
    if arch is None:
        return None
    import stenvan

    model = stenvan.build_model(arch, num_classes).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(batch):
        with torch.autocast(**amp):
            _, logits = model(batch["clips"])
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(variant: str, args, device: torch.device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    loader = make_loader(variant, args, device)
    step = make_step(args.model, loader.num_classes, device)
    epoch_s, wait_s = [], []
    try:
        for epoch in range(args.repeats + 1):  # epoch 0 warms up
            sync()
            t0 = time.perf_counter()
            waited, count = 0.0, 0
            batches = loader.epoch(epoch)
            while True:
                t_wait = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                sync()  # the batch is on the device
                waited += time.perf_counter() - t_wait
                count += 1
                if step is not None:
                    step(batch)
                    sync()
            elapsed = time.perf_counter() - t0
            assert count == args.batches, (variant, count)
            if epoch == 0:
                startup = elapsed + (t0 - start)
            else:
                epoch_s.append(elapsed)
                wait_s.append(waited)
    finally:
        loader.close()
    stats = summarize(epoch_s)
    clips = args.batches * args.P * args.K
    return {"variant": variant, "clips_per_s": clips / stats["median_s"],
            "frames_per_s": clips * args.clip_len / stats["median_s"], "startup_s": startup,
            "data_wait_share": sum(wait_s) / sum(epoch_s), **stats}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared shard folder (MARS or DukeV)")
    parser.add_argument("--raw", type=Path, help="the raw dataset folder the shards came from (for `original`)")
    parser.add_argument("--backend", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on cuda DALI decodes with `mixed`")
    parser.add_argument("--batches", type=int, default=20, help="batches per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (DALI: also threads)")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--clip-len", type=int, default=8)
    parser.add_argument("--P", type=int, default=8)
    parser.add_argument("--K", type=int, default=4)
    parser.add_argument("--model", choices=("baseline", "nvan", "ste_nvan"),
                        help="also run a training step of this model per batch and report the data-wait share")
    parser.add_argument("--hw-decoder-load", type=float, nargs="*", default=[], metavar="SHARE",
                        help="cuda: also the DALI loader with this share of the frames on the hardware JPEG decoder "
                             "(DALI's default 0.65 is the `dali-mixed` variant)")
    args = parser.parse_args(argv)
    if "original" in args.backend and args.raw is None:
        parser.error("the `original` variant reads the raw dataset: give --raw (or leave `original` out)")
    device = torch.device(args.device)
    if args.hw_decoder_load and device.type != "cuda":
        parser.error("--hw-decoder-load: the hardware JPEG decoder is a GPU's (use --device cuda)")
    if any(not 0 <= share <= 1 for share in args.hw_decoder_load):
        parser.error("--hw-decoder-load: shares run from 0 to 1")

    variants = list(args.backend) + [f"dali-mixed-hw{share:g}" for share in args.hw_decoder_load]
    results = [measure(v, args, device) for v in variants]
    base = next((r["clips_per_s"] for r in results if r["variant"] == "original"), None)
    dev = device_name(args.device)
    config = {"device": dev, "versions": versions(), "workers": args.workers, "batch": args.P * args.K,
              "clip_len": args.clip_len, "size": [args.height, args.width], "batches": args.batches,
              "model": args.model, "data": str(args.data)}
    rows = []
    for r in results:
        r["vs_original"] = r["clips_per_s"] / base if base else None
        r["variant"] = {"dali": "dali-mixed" if device.type == "cuda" else "dali-cpu"}.get(r["variant"], r["variant"])
        rows.append([r["variant"], r["clips_per_s"], r["frames_per_s"], r["min_s"], r["median_s"], r["max_s"],
                     r["startup_s"], r["vs_original"] if base else "-"]
                    + ([f"{100 * r['data_wait_share']:.1f}%"] if args.model else []))
    print_table(["variant", "clips/s", "frames/s", "min_s", "median_s", "max_s", "startup_s", "vs_original"]
                + (["data_wait"] if args.model else []), rows,
                title=f"training loader, B={args.P * args.K} clips x T={args.clip_len} at {args.height}x{args.width}, "
                      f"{args.workers} worker(s), {args.batches} batches/epoch, {dev}"
                      + (f", model {args.model}" if args.model else ""))
    print(f"results appended to {append_results('loader', [{**config, **r} for r in results])}")


if __name__ == "__main__":
    main()
