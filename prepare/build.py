"""One `prepare mars|dukev` run into an output folder: lock it, then build, continue or check the dataset there.

- A new or empty folder (`python -m prepare` refuses any other one before the scan, `stenvan.outputs`): every
  shard is written, then the manifest.
- An unfinished run (records in `.prepare/`, no manifest): shards whose record, plan, input and bytes still
  match are kept, the others written; files that the records name but the new plan does not are removed.
- A finished dataset (a manifest): it is never changed piecemeal. The same command on the same input is a
  verified no-op ("up to date": every shard's sha256 is checked); a damaged shard or manifest is restored,
  but only with bytes identical to the recorded ones; a shard whose frames only have new times is checked and
  left in place. Changed input (tracklets, frame names or sizes, or frame bytes) or changed options are refused
  with one line, and the dataset stays as it was.

Nothing is deleted that our records do not name, and an output folder has one writer at a time
(`stenvan.lock`).
"""

from __future__ import annotations

import time
from pathlib import Path

from prepare.records import (clean_temp, load_records, load_run, log, records_dir, refuse_foreign_files,
                             remove_shard, save_run)
from prepare.tracklet import PrepareError, Tracklet
from prepare.writer import ShardJob, build_manifest, check_intact, plan_shards, run_jobs
from stenvan.lock import FolderLock, LockError
from stenvan.shards import (MANIFEST, ShardFormatError, atomic_write, dataset_fingerprint, dump_json, load_manifest,
                            split_names)


def prepare_dataset(dataset: str, tracklets: list[Tracklet], skipped: list[dict], out_dir: str, root: str,
                    shard_bytes: int, workers: int = 1, skip_bad: bool = False, extra: dict | None = None) -> dict:
    """Shard `tracklets` into `out_dir` (new, unfinished or finished, see above); returns the manifest. `extra`:
    dataset fields of the manifest beside its splits (iLIDS-VID's and PRID-2011's person splits)."""
    if not tracklets:
        raise PrepareError(f"{root}: no tracklets found; check --data-dir")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder; pass a new folder (or one prepare wrote) with --out")
    try:
        lock = FolderLock(out, f"prepare {dataset}", log=log).acquire()
    except LockError as e:
        raise PrepareError(str(e)) from None
    try:
        jobs = plan_shards(tracklets, shard_bytes, root)
        options = {"shard_bytes": shard_bytes, "skip_bad": skip_bad}
        if (out / MANIFEST).exists():
            return _rerun_finished(dataset, jobs, skipped, out, options, workers, extra)
        return _build(dataset, jobs, skipped, out, options, workers, extra)
    finally:
        if records_dir(out).is_dir():
            clean_temp(out)  # of a failed or interrupted write: only inside our own records folder
        lock.release()


def _summary(dataset: str, manifest: dict, out: Path, what: str) -> None:
    splits = ", ".join(f"{name} {manifest['splits'][name]['num_tracklets']:,} tracklets / "
                       f"{manifest['splits'][name]['num_ids']:,} ids" for name in split_names(dataset))
    frames = sum(s["num_frames"] for s in manifest["shards"])
    log(f"{dataset}: {what}: {len(manifest['shards'])} shards, {frames:,} frames ({splits}) -> {out}")
    if manifest["skipped"]:
        groups: dict[str, int] = {}
        for s in manifest["skipped"]:
            groups[s["group"]] = groups.get(s["group"], 0) + 1
        log(f"--skip-bad left out {len(manifest['skipped'])} tracklets ("
            + ", ".join(f"{g} {n}" for g, n in groups.items()) + "); the counts above exclude them and "
            "manifest.json lists each under 'skipped'")


def _build(dataset: str, jobs: list[ShardJob], skipped: list[dict], out: Path, options: dict, workers: int,
           extra: dict | None) -> dict:
    """A new dataset, or the continuation of an unfinished run."""
    run = load_run(out)
    if run is not None and run["dataset"] != dataset:
        raise PrepareError(f"{out}: holds an unfinished prepare of {run['dataset']!r}, not {dataset!r}; choose "
                           "another --out or delete that folder")
    records = load_records(out) if run is not None else {}
    refuse_foreign_files(out, [n for j in jobs for n in (j.name, j.index_name)] + [MANIFEST], records)
    save_run(out, dataset, options)
    clean_temp(out)
    planned = {j.name: j for j in jobs}
    for name, record in sorted(records.items()):
        if name not in planned:
            log(f"removing {name}, written by an earlier unfinished run with another plan")
            remove_shard(out, record)
    candidates = [j for j in jobs if j.name in records and records[j.name].get("plan_sha256") == j.fingerprint
                  and records[j.name].get("inputs_sha256") == j.inputs]
    intact = check_intact([records[j.name] for j in candidates], str(out), workers)
    kept = {j.name: records[j.name] for j, ok in zip(candidates, intact) if ok}
    todo = [j for j in jobs if j.name not in kept]
    total = sum(j.num_frames for j in jobs)
    if kept:
        log(f"resuming, {len(kept)} of {len(jobs)} shards already written and verified")
    start = time.perf_counter()
    fresh = run_jobs(todo, str(out), options["skip_bad"], workers, total,
                     sum(j.num_frames for j in jobs if j.name in kept))
    seconds = time.perf_counter() - start
    manifest = build_manifest(dataset, jobs, {**kept, **{r["name"]: r for r in fresh}}, skipped, extra)
    atomic_write(out / MANIFEST, dump_json(manifest), tmp_dir=records_dir(out))
    written = sum(j.num_frames for j in todo)
    log(f"{dataset}: wrote {written:,} frames in {seconds:.1f} s ({written / max(seconds, 1e-9):,.0f} frames/s)")
    _summary(dataset, manifest, out, "done")
    return manifest


def _options_text(options: dict) -> str:
    return f"--shard-size {options.get('shard_bytes')}" + (" --skip-bad" if options.get("skip_bad") else "")


def _refuse_change(out: Path, reason: str) -> PrepareError:
    return PrepareError(f"{out}: {reason}, so the finished dataset there is left as it was; to rebuild it, prepare "
                        f"into a new folder (and switch to it when it is done), or delete {out} and rerun")


def _rerun_finished(dataset: str, jobs: list[ShardJob], skipped: list[dict], out: Path, options: dict,
                    workers: int, extra: dict | None) -> dict:
    """The same command on a finished dataset: verify it, restore damaged files, refuse any real change."""
    try:
        current, damage = load_manifest(out), None
    except ShardFormatError as e:
        current, damage = None, str(e)
    run = load_run(out)
    if run is None:
        if current is None:
            raise PrepareError(f"{out}: holds a manifest.json that prepare did not write or cannot read ({damage}) "
                               f"and no prepare records; choose another --out or delete that folder")
        raise PrepareError(f"{out}: holds a prepared dataset but not prepare's records ({records_dir(out).name}/), so "
                           "a rerun cannot tell whether its input changed; it is left as it was: prepare into a new "
                           f"folder, or delete {out} and rerun")
    if run["dataset"] != dataset:
        raise PrepareError(f"{out}: holds the prepared dataset {run['dataset']!r}, not {dataset!r}; choose another "
                           "--out or delete that folder")
    if run["options"] != options:
        raise _refuse_change(out, f"it was prepared with {_options_text(run['options'])}, this command asks for "
                                  f"{_options_text(options)}")
    if current is not None and any(current.get(k) != v for k, v in (extra or {}).items()):
        changed = ", ".join(sorted(k for k, v in extra.items() if current.get(k) != v))
        raise _refuse_change(out, f"its {changed} changed (another split file, or other frames in its persons)")
    records = load_records(out)
    planned = {j.name: j for j in jobs}
    differ = sorted(n for n, j in planned.items() if records.get(n, {}).get("plan_sha256") != j.fingerprint)
    differ += sorted(set(records) - set(planned))
    if differ:
        raise _refuse_change(out, f"its input changed (tracklets, frame names or frame sizes): {len(differ)} shards "
                                  f"would differ ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''})")

    # Same plan. Redo a shard whose files are damaged or whose frames' times changed, but keep the result
    # only if its bytes equal the recorded ones: otherwise the frames' contents changed.
    intact = check_intact([records[j.name] for j in jobs], str(out), workers)
    redo = [j for j, ok in zip(jobs, intact) if not ok or records[j.name].get("inputs_sha256") != j.inputs]
    damaged = [j.name for j, ok in zip(jobs, intact) if not ok]
    if redo:
        log(f"checking {len(redo)} shards against the input ({len(damaged)} damaged, "
            f"{len(redo) - len(damaged)} with changed frame times)")
        # An intact shard whose frames only have new times is checked, not rewritten: the same bytes leave the
        # file as it is (a job reading it would stop at a replaced shard).
        results = run_jobs(redo, str(out), options["skip_bad"], workers, sum(j.num_frames for j in redo), 0,
                           expect={j.name: records[j.name]["sha256"] for j in redo},
                           check_only=frozenset(j.name for j, ok in zip(jobs, intact) if ok))
        changed = [r["name"] for r in results if r.get("mismatch")]
        if changed:
            raise _refuse_change(out, f"the contents of its input frames changed: {len(changed)} shards would hold "
                                      f"other bytes ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})")
        records.update({r["name"]: r for r in results})
        if damaged:
            log(f"restored {len(damaged)} damaged shards with their recorded bytes: {', '.join(damaged[:5])}")
    manifest = build_manifest(dataset, jobs, records, skipped, extra)
    restored = bool(damaged)  # every damaged shard was redone
    if current is None or dataset_fingerprint(current) != dataset_fingerprint(manifest):
        # Every shard is as recorded: writing the manifest (one rename) completes the dataset at once.
        atomic_write(out / MANIFEST, dump_json(manifest), tmp_dir=records_dir(out))
        log(f"restored {MANIFEST} from the records (" + ("the old one could not be used" if current is None else
                                                          "it did not match the shards and the input") + ")")
        current, restored = manifest, True
    _summary(dataset, current, out, "restored" if restored else "up to date")
    return current
