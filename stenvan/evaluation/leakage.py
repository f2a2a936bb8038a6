"""Whether a model may be evaluated on a dataset's split: never on identities it was trained on.

A checkpoint records what its model learnt (`train_data`, written by stenvan.training.trainer): the dataset's name, the
person split and the identities of its classes. An evaluation of the same dataset whose queries or gallery hold one
of those identities is refused in one line: another person split of iLIDS-VID or PRID-2011 (their test persons are
another split's train persons), or any split made of train identities. A model trained on another dataset (MARS →
iLIDS-VID, the usual cross-dataset experiment) is allowed and labelled `cross_dataset` in metrics.json.
"""

from __future__ import annotations

from stenvan.person_splits import Split, evaluated_pids, name_of


class LeakageError(ValueError):
    """An evaluation on identities the model trained on; the message says which and what to evaluate instead."""


def training_record(dataset: str, split: Split, pids) -> dict:
    """What a checkpoint stores about its training data (`state["train_data"]`)."""
    return {"dataset": dataset, "split": split, "pids": sorted(int(p) for p in pids)}


# The checkpoints released by the original STE-NVAN project were trained on MARS's train split.
ORIGINAL_RELEASE = {"dataset": "mars", "split": None, "pids": None, "source": "original STE-NVAN release"}


def _described(dataset: str, split: Split) -> str:
    if split is None:
        return name_of(dataset)
    return f"{name_of(dataset)} {'val' if split == 'val' else f'split {split}'}"


def check_leakage(trained: dict | None, manifest: dict, split: Split, checkpoint: str) -> dict:
    """{"cross_dataset": bool | None, "trained_on": ...} for metrics.json, or LeakageError (one line).

    `trained`: the checkpoint's `train_data` (None: not recorded, a checkpoint of an older stenvan, or an untrained
    model). Identities are compared only within one dataset (pids mean nothing across datasets)."""
    if trained is None:
        return {"cross_dataset": None, "trained_on": "not recorded"}
    info = {k: v for k, v in trained.items() if k != "pids"}
    if trained["dataset"] != manifest["dataset"]:
        return {"cross_dataset": True, "trained_on": info}
    if trained.get("pids") is not None:
        seen = set(trained["pids"]) & evaluated_pids(manifest, split)
        if seen:
            raise LeakageError(
                f"{checkpoint}: trained on {_described(trained['dataset'], trained.get('split'))}, whose training "
                f"identities include {len(seen)} of those that {_described(manifest['dataset'], split)} tests (e.g. "
                f"pid {min(seen)}); its scores would be inflated. Evaluate the split it was trained on"
                + (f" (--split {trained['split']})" if trained.get("split") is not None else "")
                + ", or train on this split")
    return {"cross_dataset": False, "trained_on": info}
