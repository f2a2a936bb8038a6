"""The writer's own records in `<out>/.prepare/`: what it wrote, so that a rerun knows what is ours.

- `run.json`: the dataset and the options (`--shard-size`, `--skip-bad`) of the run that owns the folder.
- `<shard>.json`, one per shard: its sha256 and index sha256, the plan fingerprint (tracklets, frame names
  and sizes), the input fingerprint (frame sizes and modification times), the tracklet keys it holds and
  the tracklets `--skip-bad` left out of it. A record is written *before* its shard is renamed into place,
  so every shard file in the folder is named by a record.
- temporary files (`*.tmp`) of shards, indexes, records and the manifest being written.

The records stay after the manifest is written: a rerun of a finished dataset compares them with the input.
A rerun deletes only files that these records name, and temporary files inside this folder. Every name read
from a record is checked as a manifest's are (a plain shard file name of this folder, plain tracklet keys): a
record naming `../../file` (a copied, foreign or edited folder) is refused, never followed.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

from prepare.tracklet import PrepareError
from stenvan.shards import atomic_write, dump_json, plain_key, plain_shard_names

RECORDS_DIR = ".prepare"
RUN_FILE = "run.json"
RUN_FORMAT = "stenvan-prepare-records"


def records_dir(out: str | os.PathLike) -> Path:
    return Path(out) / RECORDS_DIR


def load_run(out: str | os.PathLike) -> dict | None:
    """The owning run's {dataset, options}, None when there are no records; PrepareError if they are not ours."""
    folder = records_dir(out)
    if not folder.exists():
        return None
    try:
        run = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        run = None
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        raise PrepareError(f"{folder}: not written by prepare (no readable {RUN_FILE}); move it out of the folder or "
                           "choose another --out")
    return run


def save_run(out: str | os.PathLike, dataset: str, options: dict) -> None:
    folder = records_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / RUN_FILE, dump_json({"format": RUN_FORMAT, "dataset": dataset, "options": options}))


def load_records(out: str | os.PathLike) -> dict[str, dict]:
    """Shard name → completion record; a record that cannot be read counts as absent (its shard is redone)."""
    records = {}
    for path in glob.glob(os.path.join(records_dir(out), "*.tar.json")):
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("name") == os.path.basename(path)[:-len(".json")]:
            _check_names(path, record)
            records[record["name"]] = record
    return records


def _check_names(path: str, record: dict) -> None:
    """The file names and keys of a record are plain names of this folder, or the record is refused."""
    keys = record.get("keys", [])
    if not plain_shard_names(record["name"], record.get("index")):
        problem = f"names the files {record['name']!r} and {str(record.get('index'))[:100]!r}, not a shard of this folder"
    elif not isinstance(keys, list) or not all(plain_key(k) for k in keys):
        bad = next((k for k in keys if not plain_key(k)), keys) if isinstance(keys, list) else keys
        problem = f"lists the tracklet key {str(bad)[:100]!r}, not a plain key"
    else:
        return
    out = Path(path).parent.parent
    raise PrepareError(f"{path}: {problem} (a copied, foreign or edited record); prepare follows no such name: "
                       f"prepare into a new --out, or delete {out} and rerun")


def save_record(out: str | os.PathLike, record: dict) -> None:
    atomic_write(records_dir(out) / (record["name"] + ".json"), dump_json(record))


def remove_shard(out: str | os.PathLike, record: dict) -> None:
    """Delete a shard, its index and its record (all ours: the record names them)."""
    for name in (record["name"], record.get("index")):
        if name:
            Path(out, name).unlink(missing_ok=True)
    (records_dir(out) / (record["name"] + ".json")).unlink(missing_ok=True)


def clean_temp(out: str | os.PathLike) -> None:
    """Delete temporary files of a killed or failed run (only inside our records folder)."""
    for path in glob.glob(os.path.join(records_dir(out), "*.tmp")) + glob.glob(os.path.join(records_dir(out),
                                                                                             ".*.tmp")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def refuse_foreign_files(out: str | os.PathLike, names: list[str], records: dict[str, dict]) -> None:
    """Refuse to overwrite a file the plan would write that no record of ours names (someone else's file)."""
    ours = {n for r in records.values() for n in (r.get("name"), r.get("index")) if n}
    for name in names:
        if name not in ours and Path(out, name).exists():
            raise PrepareError(f"{Path(out, name)}: exists and was not written by prepare (no record in "
                               f"{records_dir(out)} names it), so it is not overwritten; move it away or choose "
                               "another --out")


def log(line: str) -> None:
    print(f"prepare: {line}", file=sys.stderr)
