"""What a command may write over: never one of its inputs, a checkpoint, a dataset, or a file it did not write.

Every entry point that writes (train.py, eval.py, embed.py, export.py, `prepare mars|dukev`, `prepare synthetic`)
checks each output path with `check_output` before any work (before a model or any data is loaded):

- An output that is one of the command's inputs, holds one, or lies inside an input folder is refused
  (`export.py --out CHECKPOINT`, `eval.py --out SHARDS/x`, `prepare mars --out DATA_DIR`).
- An existing output must be an earlier output of the same kind, recognised by its content (`OutputKind`):
  an ONNX file carrying export.py's metadata, an .npz with embed.py's arrays, a folder with eval.py's
  metrics.json, ... Anything else (a checkpoint, a manifest, a shard, a dataset, a run folder, someone's file or
  folder) is refused, and the line says what it is. A folder output may also be new or empty (a stale `.lock`
  of ours does not count).
- Replacing an earlier output of the same kind takes `--force` (eval.py, embed.py, export.py). Where running
  again has a meaning of its own (train.py continues a run with --resume, prepare's verified reruns, the
  generator's "up to date", eval.py --summary gathering several evaluations), an output of the same kind is
  used as it is (`OutputKind.reuse`).
- An output that cannot be written is refused: a file output that is a folder or ends with '/', a path with a
  file where a folder should be, a name longer than the filesystem allows, a read-only filesystem, a folder
  without write permission.

Cheap: standard library and stenvan.shards only (the ONNX recogniser imports onnx, only for a file that starts like
one).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

from stenvan.shards import raw_dataset

NAME_MAX = 255  # bytes in one file name (Linux, macOS, Windows file systems)
# A stale lock of ours (and the temp file of a lock being taken) makes no folder foreign: stenvan.lock checks them.
IGNORED = re.compile(r"^\.lock(\.\d+\.[0-9a-f]+\.tmp)?$")


class OutputError(ValueError):
    """An output path that must not or cannot be written; the message names it and what to do. Exit code 2."""


@dataclass(frozen=True)
class OutputKind:
    what: str  # e.g. "an ONNX model written by export.py", for messages
    folder: bool  # the output is a folder (else a file)
    recognise: Callable[[Path], bool]  # an existing path is an earlier output of this kind
    reuse: bool = False  # an earlier output is continued or merged, not replaced: no --force needed


# ----------------------------------------------------------------------------------------------------------
# Recognising our own outputs, by content
# ----------------------------------------------------------------------------------------------------------

def _json(path: Path):
    try:
        with open(path, "rb") as f:
            if not f.read(1).lstrip().startswith(b"{"):
                return None
            f.seek(0)
            return json.loads(f.read(1 << 26))  # 64 MiB: more is none of our small JSON files
    except (OSError, ValueError):
        return None


def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


def _is_onnx_export(path: Path) -> bool:
    """An ONNX ModelProto (it starts with field 1, ir_version: byte 0x08) carrying export.py's input contract."""
    try:
        with open(path, "rb") as f:
            if f.read(1) != b"\x08":
                return False
        import onnx

        props = {p.key for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001 - not an ONNX file, or no onnx to read it with: not recognised
        return False
    return {"clip_len", "height", "width", "mean", "std", "layout"} <= props


FEATURE_ARRAYS = {"keys", "features", "num_frames"}  # embed.py's .npz (+ pids, camids for shards)


def _is_features(path: Path) -> bool:
    names = _zip_names(path)
    if names is None or not all(n.endswith(".npy") for n in names):
        return False
    arrays = {n[:-4] for n in names}
    return FEATURE_ARRAYS <= arrays <= FEATURE_ARRAYS | {"pids", "camids"}


def _is_metrics(obj) -> bool:
    """eval.py's metrics.json: the checkpoint it scored and one result per protocol (official, cross_camera,
    sinet, ...), each with its rank-1 and mAP (null where the protocol had nothing to score)."""
    return isinstance(obj, dict) and "checkpoint" in obj and any(
        isinstance(v, dict) and {"rank1", "mAP"} & set(v) for v in obj.values())


def _is_eval_folder(path: Path) -> bool:
    return _is_metrics(_json(path / "metrics.json"))


def _is_eval_summary(path: Path) -> bool:
    """eval.py --summary: {label: metrics, ...} (merged into, evaluation by evaluation)."""
    obj = _json(path)
    return isinstance(obj, dict) and all(_is_metrics(v) for v in obj.values())


RANKING_HEADER = "query,rank,gallery,distance"


def _is_search_folder(path: Path) -> bool:
    try:
        with open(path / "ranking.csv", encoding="utf-8") as f:
            return f.readline().startswith(RANKING_HEADER)
    except (OSError, ValueError):
        return False


STEP_FILE = re.compile(r"^step-\d{9}\.pt(\.sha256)?$")


def _is_run_folder(path: Path) -> bool:
    """train.py's run folder: its checkpoints, its log, or its config.yaml."""
    names = set(os.listdir(path))
    if names & {"last.pt", "metrics.jsonl"} or any(STEP_FILE.match(n) for n in names):
        return True
    try:
        import yaml

        config = yaml.safe_load((path / "config.yaml").read_text())
    except Exception:  # noqa: BLE001 - no config.yaml, or not YAML: not ours
        return False
    return isinstance(config, dict) and {"arch", "data", "clip_len", "ids_per_batch"} <= set(config)


SPLIT_FOLDER = re.compile(r"^split-\d+$")


def _is_split_runs(path: Path) -> bool:
    """train.py --split all|0-4|...: one run folder per person split (split-N) and their summary, splits.json."""
    names = os.listdir(path)
    return "splits.json" in names or any(SPLIT_FOLDER.match(n) and (path / n).is_dir() for n in names)


def _is_prepared_folder(path: Path) -> bool:
    """prepare's output: its records (a finished or unfinished dataset) or a stenvan manifest."""
    manifest = _json(path / "manifest.json")
    return (path / ".prepare").is_dir() or (isinstance(manifest, dict) and manifest.get("format") == "stenvan-shards")


def _is_synthetic_folder(path: Path) -> bool:
    return (path / "synthetic.json").is_file()


ONNX_MODEL = OutputKind("an ONNX model written by export.py", False, _is_onnx_export)
FEATURES = OutputKind("features written by embed.py", False, _is_features)
EVAL_FOLDER = OutputKind("the outputs of eval.py", True, _is_eval_folder)
EVAL_SUMMARY = OutputKind("an eval.py --summary file", False, _is_eval_summary, reuse=True)
SEARCH_FOLDER = OutputKind("the outputs of a search (embed.py --query --gallery)", True, _is_search_folder)
RUN_FOLDER = OutputKind("a train.py run folder", True, _is_run_folder, reuse=True)
SPLIT_RUNS = OutputKind("the person-split runs of train.py --split", True, _is_split_runs, reuse=True)
PREPARED_FOLDER = OutputKind("a dataset prepared by `python -m prepare`", True, _is_prepared_folder, reuse=True)
SYNTHETIC_FOLDER = OutputKind("a synthetic dataset", True, _is_synthetic_folder, reuse=True)


# ----------------------------------------------------------------------------------------------------------
# Saying what a foreign path is
# ----------------------------------------------------------------------------------------------------------

def describe(path: Path) -> str:
    """What an existing path holds, as far as a cheap look can tell: 'a PyTorch checkpoint', 'a prepared dataset'..."""
    if path.is_dir():
        for kind in (PREPARED_FOLDER, RUN_FOLDER, SPLIT_RUNS, EVAL_FOLDER, SEARCH_FOLDER, SYNTHETIC_FOLDER):
            if _safe(kind.recognise, path):
                return kind.what
        names = [n for n in os.listdir(path) if not IGNORED.match(n)]
        if raw_dataset(path) or {"bbox_train", "bbox_test"} & set(names):
            return "a raw dataset"
        return f"{len(names)} other entries (e.g. {sorted(names)[0]})"
    if not path.is_file():
        return "something that is not a regular file"
    if path.name.endswith(".sha256"):
        return "a checkpoint's .sha256"
    names = _zip_names(path)
    if names is not None:
        if any(n.endswith("data.pkl") for n in names):
            return "a PyTorch checkpoint"
        return "features written by embed.py" if _is_features(path) else "a zip or .npz file"
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        head = b""
    if head[:1] == b"\x80":
        return "a PyTorch checkpoint (pickle)"
    if head[257:262] == b"ustar":
        return "a tar archive (a dataset's shard?)"
    obj = _json(path)
    if isinstance(obj, dict) and obj.get("format") == "stenvan-shards":
        return "a prepared dataset's manifest"
    for kind in (EVAL_SUMMARY, ONNX_MODEL):
        if _safe(kind.recognise, path):
            return kind.what
    return "a file of another kind"


def _safe(recognise, path: Path) -> bool:
    try:
        return bool(recognise(path))
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------------------

def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _check_inputs(out: Path, kind: OutputKind, inputs: Mapping[str, str | os.PathLike | None], option: str) -> None:
    here = _resolved(out)
    for name, value in inputs.items():
        if value is None or not os.path.exists(value):
            continue  # a missing input is its own error, reported where it is read
        source = _resolved(Path(value))
        same = out.exists() and os.path.samefile(out, value)
        if same or here == source:
            raise OutputError(f"{out}: is the {name} of this command ({value}): an output never replaces an input; "
                              f"choose another {option}")
        if Path(value).is_dir() and _inside(here, source):
            raise OutputError(f"{out}: lies inside the {name} folder {value}: an output never goes into an input; "
                              f"choose another {option}")
        if kind.folder and _inside(source, here):
            raise OutputError(f"{out}: holds the {name} {value}: an output folder never holds an input; choose "
                              f"another {option}")


def _check_writable(out: Path, kind: OutputKind, option: str) -> None:
    """The folder that receives the output (or the nearest one that exists) takes new files."""
    folder = out if kind.folder and out.is_dir() else out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{out}: {folder} is a file, not a folder; choose another {option}")
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise OutputError(f"{out}: {folder} is on a read-only filesystem; choose an {option} on a writable one")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: no permission to write in {folder}; choose another {option}, or fix its "
                          "permissions")


def check_output(path: str | os.PathLike, kind: OutputKind, inputs: Mapping[str, str | os.PathLike | None] = {},
                 force: bool = False, option: str = "--out", command: str = "this command") -> Path:
    """Return `path` as a Path if `command` may write its output of `kind` there, else raise OutputError (see the
    module docstring). `inputs`: option name -> path of every input the command reads (None: not given)."""
    text = os.fspath(path)
    if not text.strip():
        raise OutputError(f"{option} is empty; name the output {'folder' if kind.folder else 'file'}")
    out = Path(text)
    longest = max(len(os.fsencode(part)) for part in out.parts)
    if longest > NAME_MAX:
        name = max(out.parts, key=lambda part: len(os.fsencode(part)))
        raise OutputError(f"{text[:60]}...: the name {name[:20]}... is {longest} bytes long, longer than file systems "
                          f"allow ({NAME_MAX}); choose another {option}")
    if _resolved(out) == Path("/"):
        raise OutputError(f"{out}: is the filesystem's root; choose a folder of its own for {option}")
    if not kind.folder and text.endswith(os.sep):
        raise OutputError(f"{text}: ends with '{os.sep}', but {option} names a file; give its file name")
    _check_inputs(out, kind, inputs, option)
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{out}: is a symlink to a missing target; choose another {option}")
    if out.exists():
        if kind.folder and not out.is_dir():
            raise OutputError(f"{out}: exists and is not a folder ({describe(out)}); {option} names a folder: choose "
                              "another path")
        if not kind.folder and out.is_dir():
            raise OutputError(f"{out}: is a folder; {option} names the file to write (e.g. {out / 'NAME'})")
        empty = kind.folder and not [n for n in os.listdir(out) if not IGNORED.match(n)]
        if not empty:
            if not _safe(kind.recognise, out):
                raise OutputError(f"{out}: holds {describe(out)}, not {kind.what}, so {command} does not write "
                                  f"there; choose another {option}")
            if not (kind.reuse or force):
                raise OutputError(f"{out}: holds {kind.what} already; pass --force to replace it, or choose another "
                                  f"{option}")
    _check_writable(out, kind, option)
    return out


# ----------------------------------------------------------------------------------------------------------
# Writing a command's outputs together
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def written_together(out_dir: str | os.PathLike, names: tuple[str, ...]) -> Iterator[Path]:
    """Yield a staging folder inside `out_dir` to write the outputs `names` (files or folders) into; when the
    block ends without an error, each is moved into place (renames need no space) and an earlier output's entry
    of these names that this run did not write is removed. On any error `out_dir` stays as it was: never new
    metrics beside an earlier evaluation's features, never half of a search's pictures. An OSError names the
    output, not its staging copy."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".staging.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        old = staging / ".replaced"
        old.mkdir()
        for name in names:
            target = out_dir / name
            if target.is_dir() and not target.is_symlink():
                os.rename(target, old / name)  # a folder cannot be replaced by a rename: move the earlier one away
            if (staging / name).exists():
                os.replace(staging / name, target)
            elif target.exists() or target.is_symlink():
                target.unlink()  # an earlier output's file that this run does not write
    except OSError as e:
        if e.filename and staging in Path(e.filename).parents:  # e.g. .metrics.json.x1y2.tmp: metrics.json
            first = Path(e.filename).relative_to(staging).parts[0]
            e.filename = str(out_dir / next((n for n in names if n in first), first))
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
