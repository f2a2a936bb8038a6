"""Which tracklets of a prepared dataset a run uses: a manifest split, narrowed to one person split.

iLIDS-VID and PRID-2011 are evaluated over 10 person splits (the manifest's `person_splits`, lists of pids;
numbered 0..9 as torchreid's `split_id`): split N trains on both cameras of its train persons and scores the
camera-1 tracklets of its test persons (queries) against their camera-2 tracklets (gallery). Their manifest
splits hold every tracklet that any person split can use (train: all of them, query: camera 1, gallery:
camera 2); `entries` narrows them to one split and numbers the train labels 0..n-1 over that split's train
persons (the model's classes). LS-VID's `val` is a split of its own, evaluated all against all.

Cheap to import (no torch): `prepare inspect` uses it too.
"""

from __future__ import annotations

from stenvan.shards import NUM_PERSON_SPLITS, PERSON_SPLIT_DATASETS

DATASET_NAMES = {"mars": "MARS", "dukev": "DukeV", "ilidsvid": "iLIDS-VID", "prid2011": "PRID-2011",
                 "lsvid": "LS-VID"}
VAL = "val"  # the --split value that selects LS-VID's val set

Split = int | str | None  # a person split 0..9, "val", or None (the dataset's test set, no person split)


class SplitError(ValueError):
    """A --split that does not fit the dataset; the message says what fits. Exit code 2."""


def name_of(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def parse_split(text: str | int | None) -> Split:
    """'3' -> 3, 'val' -> 'val', None or '' -> None; anything else is a SplitError."""
    if text is None or text == "" or isinstance(text, int):
        return text if text != "" else None
    if text == VAL:
        return VAL
    if text.strip().isdigit():
        return int(text)
    raise SplitError(f"--split {text!r}: give a person split number 0..{NUM_PERSON_SPLITS - 1} (iLIDS-VID, "
                     "PRID-2011) or 'val' (LS-VID)")


def check_split(manifest: dict, split: Split, training: bool = False) -> None:
    """Raise SplitError (one line) unless `split` fits the manifest's dataset."""
    dataset = manifest["dataset"]
    name = name_of(dataset)
    has_splits = dataset in PERSON_SPLIT_DATASETS
    if split is None:
        if has_splits:
            raise SplitError(f"{name} is evaluated over {NUM_PERSON_SPLITS} person splits: pass --split N "
                             f"(0..{NUM_PERSON_SPLITS - 1}) for one of them, or run all {NUM_PERSON_SPLITS} and "
                             "their mean with `train.py --split all`")
        return
    if split == VAL:
        if VAL not in manifest["splits"]:
            raise SplitError(f"--split val: {name} has no val split (LS-VID has one)")
        if training:
            raise SplitError("--split val selects LS-VID's val set for evaluation; training uses the train split "
                             "(leave --split out)")
        return
    if not has_splits:
        raise SplitError(f"--split {split}: {name} has no person splits (iLIDS-VID and PRID-2011 have them); "
                         "leave --split out")
    if not isinstance(split, int) or not 0 <= split < NUM_PERSON_SPLITS:
        raise SplitError(f"--split {split}: {name}'s person splits are numbered 0..{NUM_PERSON_SPLITS - 1}")


def entries(manifest: dict, name: str, split: Split = None) -> list[dict]:
    """The manifest entries of split `name` ("train", "query", "gallery", "val") that person split `split`
    uses, in manifest order; train entries carry labels 0..n-1 over the split's train persons (ascending pid).
    Without a person split: the manifest split as it is."""
    rows = manifest["splits"][name]["tracklets"]
    if not isinstance(split, int) or manifest["dataset"] not in PERSON_SPLIT_DATASETS:
        return rows
    persons = manifest["person_splits"][split]
    keep = set(persons["train"] if name == "train" else persons["test"])
    chosen = [e for e in rows if e["pid"] in keep]
    if name != "train":
        return chosen
    labels = {pid: label for label, pid in enumerate(sorted({e["pid"] for e in chosen}))}
    return [{**e, "label": labels[e["pid"]]} for e in chosen]


def eval_sets(manifest: dict, split: Split = None) -> list[tuple[str, bool | None, bool]]:
    """(manifest split, is_query, in_gallery) of the splits whose tracklets become evaluation records; is_query
    None: per tracklet, from its "query" flag.

    MARS, LS-VID: every test tracklet is a gallery record, queries marked. DukeV, iLIDS-VID, PRID-2011: the
    query split (not in the gallery) and the gallery split. LS-VID val: every val tracklet queries all of them.
    """
    if split == VAL:  # every val tracklet with an identity is a query (junk only sits in the gallery)
        return [(VAL, None, True)]
    if manifest["dataset"] in ("mars", "lsvid"):
        return [("gallery", None, True)]
    return [("query", True, False), ("gallery", False, True)]


def train_pids(manifest: dict, split: Split = None) -> list[int]:
    """The identities a model trained on this dataset (and person split) learnt: its classes, ascending."""
    return sorted({e["pid"] for e in entries(manifest, "train", split if isinstance(split, int) else None)})


def evaluated_pids(manifest: dict, split: Split = None) -> set[int]:
    """The real identities (pid > 0) an evaluation of `split` scores: its queries' and gallery's."""
    return {e["pid"] for name, _, _ in eval_sets(manifest, split) for e in entries(manifest, name, split)
            if e["pid"] > 0}
