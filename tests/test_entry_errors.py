"""Bad --config and --pretrained files end in one line naming the file, from the library and from train.py."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torchvision
from prepare_helpers import shard_mars

from stenvan.config import ConfigError, load_config
from stenvan.models import build_model

TINY = ["--arch", "baseline", "--clip_len", "2", "--height", "32", "--width", "16", "--ids_per_batch", "2",
        "--tracklets_per_id", "2", "--batches_per_epoch", "1", "--workers", "0", "--loader", "torch",
        "--max_steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def shards(mars_tree, module_tmp):
    out = module_tmp("entry") / "shards"
    shard_mars(mars_tree, out)
    return out


def train_one_line(capsys, *args) -> str:
    capsys.readouterr()
    code = importlib.import_module("train").main([str(a) for a in args])
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("train: error: "), lines
    return lines[0]


def bad_configs(tmp_path) -> dict:
    (tmp_path / "syntax.yaml").write_text("arch: nvan\nlr: [1e-4\nepochs: 3\n")
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00arch")
    (tmp_path / "int_key.yaml").write_text("arch: nvan\n1: 2\n")  # a TypeError in the old code
    (tmp_path / "null_key.yaml").write_text("~: 2\n")
    return {"syntax.yaml": "not valid YAML at line", "folder.yaml": "is a folder", "binary.yaml": "not a text file",
            "int_key.yaml": "the key 1 is not a config key name", "null_key.yaml": "the key None is not a config key"}


def test_bad_config_files_are_config_errors(tmp_path):
    for name, message in bad_configs(tmp_path).items():
        with pytest.raises(ConfigError, match=message) as e:
            load_config(str(tmp_path / name), data="d")
        assert str(e.value).startswith(str(tmp_path / name))


def test_bad_config_files_in_train_py(shards, tmp_path, capsys):
    for name, message in bad_configs(tmp_path).items():
        line = train_one_line(capsys, "--config", tmp_path / name, "--data", shards, "--out", tmp_path / "run",
                              "--pretrained", "none", *TINY)
        assert str(tmp_path / name) in line and message in line


class Payload:
    def __reduce__(self):  # what a malicious file does: call a function while unpickling (a harmless one here)
        return (os.getcwd, ())


def bad_weights(tmp_path) -> dict:
    torch.save({"conv1.weight": Payload()}, tmp_path / "code.pth")
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "full.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:100_000])
    return {"code.pth": "refused: the file holds pickled Python code",  # torch names posix.getcwd in it
            "truncated.pth": "cannot be loaded as a PyTorch state dict (RuntimeError: "}


def test_bad_pretrained_files_name_the_file(shards, tmp_path, capsys):
    for name, message in bad_weights(tmp_path).items():
        with pytest.raises(ValueError, match="pth") as e:
            build_model("baseline", 4, pretrained=str(tmp_path / name))
        assert str(e.value).startswith(f"{tmp_path / name}: ") and message in str(e.value)
        assert "\n" not in str(e.value) and (name != "code.pth" or "posix.getcwd" in str(e.value))
        line = train_one_line(capsys, "--data", shards, "--out", tmp_path / "run", "--pretrained", tmp_path / name,
                              *TINY)
        assert f"{tmp_path / name}: " in line and message in line


def test_a_checkpoint_holding_pickled_code_is_one_line_without_unsafe_advice(shards, tmp_path, capsys):
    """torch's refusal is six lines ending in "re-running with weights_only=False will likely succeed" (which would
    run the code); it says so even for a file that is not a PyTorch file. Never that advice, always one line."""
    data, out = shards, tmp_path / "out"  # a prepared dataset: eval checks it (and the split) before the model
    torch.save({"format": "stenvan-checkpoint", "model": Payload()}, tmp_path / "code.pt")
    (tmp_path / "text.pt").write_text("hello, not a checkpoint")
    for args, message in (
            (["eval", "--checkpoint", tmp_path / "code.pt", "--data", data, "--out", out],
             "refused: the file holds pickled Python code (posix.getcwd)"),
            (["eval", "--checkpoint", tmp_path / "code.pt", "--original-arch", "nvan", "--data", data, "--out",
              out], "refused: the file holds pickled Python code (posix.getcwd)"),
            (["embed", "--checkpoint", tmp_path / "code.pt", "--tracklets", data, "--out", out / "f.npz"],
             "refused: the file holds pickled Python code (posix.getcwd)"),
            (["export", "--checkpoint", tmp_path / "code.pt", "--out", out / "m.onnx"],
             "refused: the file holds pickled Python code (posix.getcwd)"),
            (["eval", "--checkpoint", tmp_path / "text.pt", "--data", data, "--out", out],
             "cannot be loaded as a stenvan checkpoint (not a PyTorch file, or a damaged one)")):
        capsys.readouterr()
        code = importlib.import_module(args[0]).main([str(a) for a in args[1:]])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, lines)
        assert "weights_only" not in lines[0] and "will likely succeed" not in lines[0]
