"""OSErrors of train.py and eval.py end in one line naming the path (exit 2), with nothing half-written: an --out
that is a file, a read-only folder, a full disk while writing a checkpoint, its sidecar, metrics.jsonl or eval's
outputs. A training run keeps its earlier checkpoints and resumes once there is room again."""

from __future__ import annotations

import builtins
import errno
import importlib
import io
import json
import os

import pytest

from stenvan import checkpoint
from stenvan.checkpoint import read_checkpoint, step_checkpoints
from tests.test_train import TINY, shards  # noqa: F401 - the module's shard fixture
from tests.tiny_checkpoint import tiny_checkpoint



def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write() to a full disk raises: no file name


def one_error_line(capsys, tool: str, argv) -> str:
    """Run train.py's or eval.py's main in this process: exit code 2 and exactly one line on stderr."""
    capsys.readouterr()
    code = importlib.import_module(tool).main([str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), (code, lines)
    return lines[0]


def train_args(shards, out, *extra):  # noqa: F811
    return ["--data", shards, "--out", out, *TINY, "--ckpt_minutes", "0", *extra]


def read_only(folder, monkeypatch) -> None:
    """Make writes under `folder` fail as in a read-only folder. Not as root: chmod (permissions stop them).
    As root, whom permissions do not stop: the calls that create files and folders there raise EROFS."""
    folder = os.path.abspath(folder)
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return

    def inside(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(folder + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_os_open, real_open, real_mkdir, real_link = os.open, builtins.open, os.mkdir, os.link

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(path, mode="r", *args, **kwargs):
        if inside(path) and any(c in mode for c in "wax+"):
            refuse(path)
        return real_open(path, mode, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.exists(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def link(src, dst, *args, **kwargs):
        if inside(dst):
            refuse(dst)
        return real_link(src, dst, *args, **kwargs)

    for target, name, fake in ((os, "open", os_open), (builtins, "open", open_), (io, "open", open_),
                               (os, "mkdir", mkdir), (os, "link", link)):
        monkeypatch.setattr(target, name, fake)


# ----------------------------------------------------------------------------------------------------------
# train.py
# ----------------------------------------------------------------------------------------------------------

def test_train_out_that_is_a_file(shards, tmp_path, capsys):  # noqa: F811
    (tmp_path / "run").write_text("not a folder")
    line = one_error_line(capsys, "train", train_args(shards, tmp_path / "run"))
    assert line == (f"train: error: {tmp_path / 'run'}: exists and is not a folder (a file of another kind); --out "
                    "names a folder: choose another path")


def test_train_in_a_read_only_folder(shards, tmp_path, capsys, monkeypatch):  # noqa: F811
    (tmp_path / "run").mkdir()
    read_only(tmp_path / "run", monkeypatch)
    line = one_error_line(capsys, "train", train_args(shards, tmp_path / "run"))
    monkeypatch.undo()
    assert line.startswith(f"train: error: {tmp_path / 'run'}: cannot write in the run folder (")
    assert "choose a" in line and list((tmp_path / "run").iterdir()) == []


class FullAfter:
    """A file whose disk fills up after `limit` bytes: write() then raises ENOSPC, as a real full disk does."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.written = f, limit, 0

    def write(self, data):
        if self.written + len(data) > self.limit:
            raise enospc()
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def write_fails(monkeypatch, nth: int):
    """The disk fills up 1 MiB into the nth checkpoint (written by the background writer thread)."""
    real, count = checkpoint._HashingFile.__init__, []

    def init(self, f):
        count.append(f)
        real(self, FullAfter(f, 1 << 20) if len(count) == nth else f)

    monkeypatch.setattr(checkpoint._HashingFile, "__init__", init)


def test_a_full_disk_during_a_checkpoint_write_keeps_the_earlier_ones_resumable(
        shards, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    write_fails(monkeypatch, nth=2)
    line = one_error_line(capsys, "train", train_args(shards, out, "--max_steps", "2", "--ckpt_every", "1"))
    monkeypatch.undo()
    assert line == (f"train: error: writing a checkpoint in {out} failed: {out / 'step-000000002.pt'}: No space left "
                    "on device; the disk is full: free some space, then continue with --resume auto")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left
    assert [p.name for p in step_checkpoints(out)] == ["step-000000001.pt"]
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 1
    assert importlib.import_module("train").main(
        [str(a) for a in train_args(shards, out, "--max_steps", "2", "--resume", "auto")]) == 0
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 2


def test_a_full_disk_at_the_sidecar_leaves_an_unverified_checkpoint_that_resume_passes_over(
        shards, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    real, sidecars = checkpoint.atomic_write, []

    def atomic_write(path, data, tmp_dir=None):
        sidecars.append(path)
        if len(sidecars) == 2:  # step 2's data is in place; its sidecar cannot be written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data, tmp_dir)

    monkeypatch.setattr(checkpoint, "atomic_write", atomic_write)
    line = one_error_line(capsys, "train", train_args(shards, out, "--max_steps", "2", "--ckpt_every", "1"))
    monkeypatch.undo()
    assert f"{out / 'step-000000002.pt.sha256'}: No space left on device" in line
    assert (out / "step-000000002.pt").exists() and read_checkpoint(out / "last.pt")["progress"]["global_step"] == 1
    assert importlib.import_module("train").main(
        [str(a) for a in train_args(shards, out, "--max_steps", "2", "--resume", "auto")]) == 0
    captured = capsys.readouterr()
    assert f"resume: skipping {out / 'step-000000002.pt'}: unverified" in captured.err
    assert f"resume: {out / 'step-000000001.pt'} at epoch 0, step 1" in captured.out  # the verified one
    assert (out / "step-000000002.pt.sha256").exists()  # rewritten, verified
    assert read_checkpoint(out / "step-000000002.pt")["progress"]["global_step"] == 2


def test_a_full_disk_under_metrics_jsonl(shards, tmp_path, capsys, monkeypatch):  # noqa: F811
    import stenvan.training.runlog

    def open_(path, *args, **kwargs):  # no room for a log line
        f = builtins.open(path, *args, **kwargs)
        return FullAfter(f, 0) if str(path).endswith("metrics.jsonl") else f

    monkeypatch.setattr(stenvan.training.runlog, "open", open_, raising=False)
    out = tmp_path / "run"
    line = one_error_line(capsys, "train", train_args(shards, out, "--max_steps", "3", "--ckpt_every", "1"))
    assert line == (f"train: error: {out / 'metrics.jsonl'}: No space left on device; the disk is full: free some "
                    "space, then continue with --resume auto")
    # It stopped at the next step boundary; the checkpoint taken meanwhile is written and verifies.
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 1


# ----------------------------------------------------------------------------------------------------------
# eval.py
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def model(tmp_path):
    return tiny_checkpoint(tmp_path / "model.pt")


def eval_args(model, shards, out):  # noqa: F811
    return ["--checkpoint", model, "--data", shards, "--loader", "torch", "--workers", "0", "--out", out]


def test_eval_out_that_is_a_file(model, shards, tmp_path, capsys):  # noqa: F811
    (tmp_path / "eval").write_text("not a folder")
    line = one_error_line(capsys, "eval", eval_args(model, shards, tmp_path / "eval"))
    assert line == (f"eval: error: {tmp_path / 'eval'}: exists and is not a folder (a file of another kind); --out "
                    "names a folder: choose another path")


def test_eval_into_a_read_only_folder(model, shards, tmp_path, capsys, monkeypatch):  # noqa: F811
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro", monkeypatch)
    line = one_error_line(capsys, "eval", eval_args(model, shards, tmp_path / "ro" / "eval"))
    monkeypatch.undo()
    assert line.startswith(f"eval: error: {tmp_path / 'ro' / 'eval'}: ") and "choose a" in line
    assert list((tmp_path / "ro").iterdir()) == []


def test_a_full_disk_while_eval_writes_leaves_the_earlier_outputs_as_they_were(
        model, shards, tmp_path, capsys, monkeypatch):  # noqa: F811
    import stenvan.evaluation.evaluate

    out = tmp_path / "eval"
    out.mkdir()
    earlier = json.dumps({"official": {"rank1": 0.5}, "checkpoint": "an earlier evaluation's"}) + "\n"
    (out / "metrics.json").write_text(earlier)
    real = stenvan.evaluation.evaluate.atomic_write

    def atomic_write(path, data, tmp_dir=None):
        if os.path.basename(path) == "features.npz":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data, tmp_dir)

    monkeypatch.setattr(stenvan.evaluation.evaluate, "atomic_write", atomic_write)
    line = one_error_line(capsys, "eval", eval_args(model, shards, out) + ["--force"])
    assert line == (f"eval: error: {out / 'features.npz'}: No space left on device; the disk is full: free some "
                    "space, then rerun")
    assert [p.name for p in out.iterdir()] == ["metrics.json"]  # no staging folder, no new file beside the old
    assert (out / "metrics.json").read_text() == earlier
