"""Command line of `python -m prepare`: synthetic data, datasets → shards, verify, inspect.

    python -m prepare synthetic --layout mars --out data/synthetic_mars --ids 60 --seed 0
    python -m prepare mars --data-dir data/MARS --info-dir data/MARS/info --out shards/mars --workers 8
    python -m prepare dukev --data-dir data/DukeMTMC-VideoReID --out shards/dukev --workers 8
    python -m prepare ilidsvid --data-dir data/iLIDS-VID --out shards/ilidsvid
    python -m prepare prid2011 --data-dir data/prid2011 --out shards/prid2011 [--splits splits_prid2011.json]
    python -m prepare lsvid --data-dir data/LS-VID --out shards/lsvid --workers 8
    python -m prepare verify shards/mars [--deep]
    python -m prepare inspect shards/mars [--json] [--split N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys

from prepare.tracklet import PrepareError
from stenvan.errors import describe_os_error
from stenvan.outputs import PREPARED_FOLDER, SYNTHETIC_FOLDER, OutputError, check_output
from stenvan.shards import ShardFormatError

RETRY = "rerun the same command (finished shards are kept)"  # how to carry on after an OSError's cause is fixed
LAYOUTS = ("mars", "dukev", "ilidsvid", "prid2011", "lsvid")
DATASETS = LAYOUTS  # what `prepare <dataset>` shards

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def byte_size(text: str) -> int:
    """'256MB', '1GiB', '4096' → bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 256MB, 1GiB, 65536)")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prepare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    syn = sub.add_parser("synthetic", help="write a synthetic dataset in the layout of MARS, DukeV, iLIDS-VID, "
                                           "PRID-2011 or LS-VID",
                         description="Small datasets with --ids N; the distributed dataset's numbers with --real-sizes "
                                     "(MARS, DukeV: also --scale and the per-size options).")
    syn.add_argument("--layout", choices=LAYOUTS, required=True)
    syn.add_argument("--out", required=True, help="new or empty folder (a finished one with the same options: no-op)")
    syn.add_argument("--ids", type=int, help="identities, split between train and test (default 60; not with sizes)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--min-len", type=int, help="shortest tracklet in frames (default 2)")
    syn.add_argument("--max-len", type=int, help="longest tracklet in frames (default 120; real sizes: 920 MARS)")
    syn.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                     help="processes; the bytes are the same for any number")
    sized = syn.add_argument_group("exact split sizes (any of these starts from the real sizes of --layout)")
    sized.add_argument("--real-sizes", action="store_true",
                       help="MARS: 625 ids / 8,298 tracklets / 509,914 frames train; 634 ids + distractors + junk "
                            "/ 12,180 tracklets / 681,089 frames / 1,980 queries test. DukeV: 702 / 2,196 / "
                            "369,656 train; 702 + 408 distractor ids / 2,636 gallery tracklets / 445,764 frames. "
                            "iLIDS-VID: 300 persons / 600 sequences of 23-192 frames (PNG). PRID-2011: 385 + 749 "
                            "persons, 178 kept by the protocol (PNG). LS-VID: 3,772 ids / 14,943 tracklets / ~3M "
                            "frames (large: tens of GB)")
    sized.add_argument("--scale", type=float, help="multiply the real counts (both splits) by this factor")
    sized.add_argument("--test-scale", type=float, help="multiply the test split's real counts by this instead")
    from prepare.synthetic_sizes import OPTION_HELP

    for name, text in OPTION_HELP.items():
        sized.add_argument("--" + name.replace("_", "-"), type=int, dest="size_" + name, metavar="N", help=text)
    duke = syn.add_argument_group("quirks of the distributed DukeV (fractions of the tracklets)")
    duke.add_argument("--quirk-f0002", type=float, default=0.0, metavar="F",
                      help="tracklets whose frame numbers start at F0002 instead of F0001")
    duke.add_argument("--quirk-old-names", type=float, default=0.0, metavar="F",
                      help="tracklets named the older way, 0001C6F0099X30823.jpg")

    def shard_options(p):
        p.add_argument("--out", required=True, help="output folder for shards + manifest.json")
        p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="writer processes")
        p.add_argument("--shard-size", type=byte_size, default=byte_size("256MB"), help="target shard size")
        p.add_argument("--skip-bad", action="store_true",
                       help="skip a broken tracklet (listed in the manifest) instead of stopping")

    mars = sub.add_parser("mars", help="shard a MARS tree (bbox_train/, bbox_test/, info/)")
    mars.add_argument("--data-dir", required=True)
    mars.add_argument("--info-dir", help="the MARS-evaluation info/ folder (default: DATA_DIR/info)")
    shard_options(mars)
    duke = sub.add_parser("dukev", help="shard a DukeMTMC-VideoReID tree (train/, query/, gallery/)")
    duke.add_argument("--data-dir", required=True)
    shard_options(duke)
    ilids = sub.add_parser("ilidsvid", help="shard an iLIDS-VID tree (i-LIDS-VID/sequences/, train-test people "
                                            "splits/) with its 10 person splits")
    ilids.add_argument("--data-dir", required=True, help="the extracted archive, or torchreid's ilids-vid/ folder")
    shard_options(ilids)
    prid = sub.add_parser("prid2011", help="shard a PRID-2011 tree (prid_2011/multi_shot/) with its 10 person splits")
    prid.add_argument("--data-dir", required=True, help="the folder holding prid_2011/ (torchreid's prid2011/)")
    prid.add_argument("--splits", help="torchreid's splits_prid2011.json (default: DATA_DIR/splits_prid2011.json if "
                                       "it exists; without one, 10 seeded splits that are not the published ones)")
    shard_options(prid)
    ls = sub.add_parser("lsvid", help="shard an LS-VID tree (list_sequence/, test/data/info_test.mat, tracklet_*/)")
    ls.add_argument("--data-dir", required=True)
    shard_options(ls)

    ver = sub.add_parser("verify", help="check a prepared dataset: checksums, indexes, counts")
    ver.add_argument("dir")
    ver.add_argument("--deep", action="store_true", help="also decode every frame")
    ins = sub.add_parser("inspect", help="ids, tracklets, frames, lengths and cameras per split")
    ins.add_argument("dir")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--split", help="iLIDS-VID, PRID-2011: person split 0..9; LS-VID: val. Lists that split's "
                                     "tracklets (train, query, gallery) with their source folder, camera and frames")
    return parser


class Stopped(Exception):
    """SIGTERM (a scheduler, `kill`): stop like Ctrl-C, cleanly."""


def _stop_on_sigterm(signum, frame):
    raise Stopped()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if args.command in DATASETS else None
    try:
        return _run(args)
    except (PrepareError, ShardFormatError, OutputError, FileExistsError, ValueError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError as e:
        if args.command not in ("inspect", "verify"):
            print(f"prepare: error: {describe_os_error(e, RETRY)}", file=sys.stderr)
            return 2
        # `prepare inspect DIR | head`: the reader took what it wanted; no error line, and Python's final flush of
        # stdout must not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        print(f"prepare: error: {describe_os_error(e, RETRY)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as e:
        signum = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        resume = (" Finished shards are kept: rerun the same command to continue where it stopped."
                  if args.command in DATASETS else "")
        print(f"prepare: interrupted by {signal.Signals(signum).name}.{resume}", file=sys.stderr)
        return 128 + signum
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _synthetic(args) -> int:
    from prepare.synthetic import generate
    from prepare.synthetic_sizes import OPTION_HELP, REAL, scaled

    overrides = {f: getattr(args, "size_" + f) for f in OPTION_HELP if getattr(args, "size_" + f) is not None}
    sizes = None
    scale, test_scale = args.scale, args.test_scale
    new_layout = args.layout not in REAL  # iLIDS-VID, PRID-2011, LS-VID: --ids or --real-sizes only
    if new_layout and (scale is not None or test_scale is not None or overrides):
        raise ValueError(f"--layout {args.layout} takes --ids or --real-sizes (with --min-len/--max-len); --scale and "
                         "the per-size options are for mars and dukev")
    if not new_layout and (args.real_sizes or scale is not None or test_scale is not None or overrides):
        sizes = REAL[args.layout]
        if scale is not None or test_scale is not None:
            scale = 1.0 if scale is None else scale
            sizes = scaled(args.layout, sizes, scale, scale if test_scale is None else test_scale)
        sizes = type(sizes)(**{**sizes.as_dict(), **overrides})
    check_output(args.out, SYNTHETIC_FOLDER, command="prepare synthetic")  # before any work
    try:
        counts = generate(args.layout, args.out, args.ids, args.seed, args.min_len, args.max_len, sizes=sizes,
                          workers=args.workers, quirk_f0002=args.quirk_f0002, quirk_old_names=args.quirk_old_names,
                          real_sizes=new_layout and args.real_sizes)
    except KeyboardInterrupt:
        print(f"prepare: interrupted; nothing was left in {args.out}", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only folder: the partial output is already removed
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    if counts["up_to_date"]:
        print(f"synthetic {args.layout}: {args.out} is up to date ({counts['frames']:,} frames, same options)")
        return 0
    print(f"synthetic {args.layout}: {counts['frames']:,} frames in {counts['seconds']:.1f} s "
          f"({counts['frames_per_s']:,.0f} frames/s, {args.workers} workers), "
          f"{counts['bytes'] / max(counts['frames'], 1) / 1e3:.1f} KB/frame, {counts['bytes'] / 1e6:,.1f} MB "
          f"-> {args.out}")
    return 0


def _run(args) -> int:
    if args.command == "synthetic":
        return _synthetic(args)
    if args.command in DATASETS:
        from prepare.build import prepare_dataset

        if args.workers < 1:
            raise PrepareError("--workers must be at least 1")
        # Before any work: never into the raw dataset, nor into a folder holding anything but prepare's output.
        inputs = {"--data-dir": args.data_dir, "--info-dir": getattr(args, "info_dir", None),
                  "--splits": getattr(args, "splits", None)}
        check_output(args.out, PREPARED_FOLDER, inputs, command=f"prepare {args.command}")
        tracklets, skipped, extra, notes = _scan(args)
        for line in notes:
            print(f"prepare: {line}", file=sys.stderr)
        for s in skipped:
            print(f"prepare: skipped {s['key']}: {s['reason']}", file=sys.stderr)
        manifest = prepare_dataset(args.command, tracklets, skipped, args.out, args.data_dir, args.shard_size,
                                   args.workers, args.skip_bad, extra)
        for s in manifest["skipped"][len(skipped):]:
            print(f"prepare: skipped {s['key']}: {s['reason']}", file=sys.stderr)
        return 0
    if args.command == "verify":
        from prepare.verify import verify

        problems = verify(args.dir, deep=args.deep)
        for p in problems:
            print(p)
        if not problems:
            print(f"{args.dir}: OK{' (every frame decoded)' if args.deep else ''}")
        return 1 if problems else 0
    from prepare.summary import format_summary, summarize
    from stenvan.person_splits import parse_split

    summary = summarize(args.dir, parse_split(args.split))
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 1 if summary["problems"] else 0  # as verify: a dataset whose shards are not the manifest's


def _scan(args) -> tuple[list, list, dict | None, list[str]]:
    """(tracklets, skipped, the manifest's dataset fields, lines to print) of the dataset `args.command`."""
    if args.command == "mars":
        from prepare.mars import scan_mars

        return (*scan_mars(args.data_dir, args.info_dir or os.path.join(args.data_dir, "info"), args.skip_bad),
                None, [])
    if args.command == "dukev":
        from prepare.dukev import scan_dukev

        return (*scan_dukev(args.data_dir, args.skip_bad), None, [])
    if args.command == "ilidsvid":
        from prepare.ilidsvid import scan_ilidsvid

        return scan_ilidsvid(args.data_dir, args.skip_bad)
    if args.command == "prid2011":
        from prepare.prid2011 import scan_prid2011

        return scan_prid2011(args.data_dir, args.splits, args.skip_bad)
    from prepare.lsvid import scan_lsvid

    tracklets, skipped, notes = scan_lsvid(args.data_dir, args.skip_bad)
    return tracklets, skipped, None, notes
