"""Config: presets reproduce the paper's recipe, overrides are typed, bad keys and values are clear errors."""

from __future__ import annotations

import glob

import pytest
import yaml

from stenvan.config import ConfigError, TrainConfig, config_from_dict, load_config


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*_mars.yaml") + glob.glob("configs/*_dukev.yaml")))
def test_presets_are_the_paper_recipe(path):
    cfg = load_config(path, data="shards/x")
    arch = path.split("/")[-1].rsplit("_", 1)[0]
    assert cfg.arch == arch
    assert (cfg.clip_len, cfg.height, cfg.width) == (8, 256, 128)
    assert (cfg.ids_per_batch, cfg.tracklets_per_id, cfg.batches_per_epoch) == (8, 4, 0)
    assert (cfg.optimizer, cfg.lr, cfg.lr_schedule, cfg.lr_step_epochs, cfg.lr_gamma, cfg.warmup_epochs) == \
        ("adam", 1e-4, "step", 50, 0.1, 0)
    assert (cfg.weight_decay, cfg.epochs) == ((1e-5, 300) if arch == "baseline" else (5e-5, 200))
    assert (cfg.triplet, cfg.triplet_weight, cfg.ce_weight, cfg.label_smoothing) == ("soft", 1.0, 1.0, 0.0)
    assert (cfg.flip_p, cfg.pad, cfg.erase_p) == (0.5, 0, 0.0)
    assert cfg.pretrained == "imagenet" and cfg.stem_relu is False
    if arch == "ste_nvan":
        assert (cfg.stripes, cfg.temporal_attention) == (16, "pair")


def test_overrides_are_typed():
    cfg = load_config("configs/nvan_mars.yaml", ["--lr", "3e-4", "--compile", "true", "--lr_milestones", "40,70",
                                                 "--max-steps=12", "--precision", "fp32"], data="d")
    assert (cfg.lr, cfg.compile, cfg.lr_milestones, cfg.max_steps, cfg.precision) == (3e-4, True, (40, 70), 12, "fp32")
    assert load_config(None, ["--compile", "false"], data="d").compile is False  # never bool("false")


@pytest.mark.parametrize("args, message", [
    (["--lrr", "1"], "unknown config key 'lrr'; did you mean lr"),
    (["--lr", "fast"], "lr='fast' is not a number"),
    (["--compile", "maybe"], "not a boolean"),
    (["--epochs", "2.5"], "not an integer"),
    (["--arch", "resnet"], "valid values are baseline, nvan, ste_nvan"),
    (["--clip_len", "6"], "multiple of 4"),
    (["--height", "64", "--stripes", "16"], "stripes=16 must divide"),
    (["--lr_schedule", "multistep"], "needs lr_milestones"),
    (["--lr"], "needs a value"),
    (["--stripes", "0"], "stripes=0 must be at least 1"),
    (["--lr_step_epochs", "0"], "lr_step_epochs=0"),
    (["--height", "0"], "positive multiples of 16"),
    (["--lr", "inf"], "positive finite"),
    (["--lr_gamma", "-1"], "lr_gamma=-1.0"),
    (["--warmup_epochs", "-2"], "warmup_epochs=-2"),
    (["lr", "1"], "expected --key value"),
])
def test_bad_overrides_are_clear_errors(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, args, data="d")


def test_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("arch: nvan\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="a.yaml: unknown config key 'learning_rate'"):
        load_config(str(tmp_path / "a.yaml"), data="d")
    (tmp_path / "b.yaml").write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="b.yaml: epochs='many' is not an integer"):
        load_config(str(tmp_path / "b.yaml"), data="d")
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"), data="d")
    with pytest.raises(ConfigError, match="data: set the prepared shard folder"):
        load_config(None)


def test_round_trip_through_yaml_and_dict():
    cfg = load_config("configs/ste_nvan_dukev.yaml", ["--lr_milestones", "3,5"], data="d")
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    with pytest.raises(Exception):
        cfg.lr = 1.0  # frozen
    assert isinstance(cfg, TrainConfig)
