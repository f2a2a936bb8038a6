"""The clip models: shapes, golden parameter and FLOP counts, STE-NVAN's pair-local attention, layouts, options,
ImageNet initialisation. Small frames (64×32, 4 stripes) keep the real forwards fast on the CPU; the golden counts
run at the paper's 8×256×128 on the meta device."""

import copy
import urllib.error

import pytest
import torch

import stenvan
from stenvan.models import build_model, forward_gflops
from stenvan.models.video_net import DEFAULT_NL_POSITIONS

SMALL = {"baseline": {}, "nvan": {}, "ste_nvan": {"stripes": 4}}  # 64×32 frames: layer3 maps are 4×2


def _active_non_local(model):
    """Give every NL block a non-zero BN (a fresh block is the identity) and fixed running statistics."""
    for block in model.non_local.values():
        torch.nn.init.normal_(block.bn.weight)
        torch.nn.init.normal_(block.bn.bias)
        block.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_build_model_is_exported_lazily():
    assert stenvan.build_model is build_model


@pytest.mark.parametrize("arch", ["baseline", "nvan", "ste_nvan"])
@pytest.mark.parametrize("clip_len", [4, 8])
def test_output_shapes(arch, clip_len):
    torch.manual_seed(0)
    model = build_model(arch, 11, **({"stripes": 2} if arch == "ste_nvan" else {}))
    clips = torch.randn(2, clip_len, 3, 32, 16)  # tiny frames: maps of 4×2 at layer2, 2×1 at layer3
    with torch.no_grad():
        feats = model.forward_features(clips)
        kept = clip_len // 4 if arch == "ste_nvan" else clip_len  # STE-NVAN halves T after layer2 and layer3
        assert feats.shape == (2, kept, 2048, 2, 1)  # last stride 1: 1/16 of the frame
        f, logits = model(clips)
        assert f.shape == (2, 2048) and logits.shape == (2, 11)
        assert model.eval()(clips).shape == (2, 2048)


def test_nvan_accepts_any_clip_length():
    model = build_model("nvan", 5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 3, 32, 16)).shape == (1, 2048)


def test_default_non_local_positions_are_the_originals():
    model = build_model("nvan", 10)
    assert sorted(model.non_local) == ["layer2_2", "layer2_3", "layer3_3", "layer3_4", "layer3_5"]
    assert DEFAULT_NL_POSITIONS == {"layer2": (2, 3), "layer3": (3, 4, 5)}
    custom = build_model("ste_nvan", 10, nl_positions={"layer3": [0, 5], "layer4": []}, stripes=2)
    assert sorted(custom.non_local) == ["layer3_0", "layer3_5"]


@pytest.mark.parametrize("arch", ["baseline", "nvan", "ste_nvan"])
def test_parameter_counts(arch):
    with torch.device("meta"):
        model = build_model(arch, 625)
    backbone = sum(p.numel() for p in model.backbone.parameters())
    non_local = sum(p.numel() for p in model.non_local.parameters())
    assert abs(backbone - 23.51e6) <= 0.001 * 23.51e6  # design §3: 23.51 M
    assert non_local == 0 if arch == "baseline" else abs(non_local - 7.36e6) <= 0.001 * 7.36e6  # 7.36 M
    head = sum(p.numel() for p in model.head.parameters())
    assert head == 2 * 2048 + 2048 * 625  # BNNeck + bias-free classifier


@pytest.mark.parametrize("arch, gflops", [("nvan", 127.1), ("ste_nvan", 35.4), ("baseline", 64.9)])
@pytest.mark.parametrize("attention", ["fused", "reference"])
def test_forward_gflops_per_clip(arch, gflops, attention):
    # One 8-frame 256×128 clip, counted on the meta device (shapes only, no compute).
    options = {} if arch == "baseline" else {"attention": attention}
    with torch.device("meta"):
        model = build_model(arch, 625, **options).eval()
        measured = forward_gflops(model, torch.empty(1, 8, 3, 256, 128))
    assert abs(measured - gflops) <= 0.02 * gflops, measured


def test_ste_nvan_attends_within_frame_pairs():
    torch.manual_seed(0)
    clips = torch.randn(1, 8, 3, 64, 32)
    changed = clips.clone()
    changed[:, 4:] = torch.randn(1, 4, 3, 64, 32)  # frames 4-7 only
    outputs = {}
    for attention in ("pair", "clip"):
        torch.manual_seed(1)
        model = _active_non_local(build_model("ste_nvan", 10, stripes=4, temporal_attention=attention))
        captured = []
        # Layer-3 output: after its last NL block, before the second max-pool; 4 frames (0-1, 2-3, 4-5, 6-7).
        model.non_local["layer3_5"].register_forward_hook(lambda mod, inp, out: captured.append(out))
        with torch.no_grad():
            model(clips)
            model(changed)
        outputs[attention] = captured
    before, after = outputs["pair"]
    assert torch.equal(before[:2], after[:2])  # the layer-3 output of frames 0-3 is untouched
    assert not torch.allclose(before[2:], after[2:])
    before, after = outputs["clip"]
    assert not torch.allclose(before[:2], after[:2])  # the all-frames variant does mix the pairs


@pytest.mark.parametrize("arch", ["baseline", "nvan", "ste_nvan"])
def test_channels_last_model_gives_the_same_output(arch):
    torch.manual_seed(0)
    model = _active_non_local(build_model(arch, 10, **SMALL[arch]))
    clips = torch.randn(2, 4 if arch != "ste_nvan" else 8, 3, 64, 32)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    layouts = []
    model_cl.backbone.layer4[-1].register_forward_hook(
        lambda mod, inp, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        expected, out = model(clips), model_cl(clips)
    assert layouts == [True]  # the activations really ran channels_last, through every NL block
    # Other conv algorithms, other fp32 rounding: both layouts sit ≈ 1e-5 (max-relative) from a float64 forward.
    assert (out - expected).abs().max() <= 5e-5 * expected.abs().max()


def test_stem_relu_option():
    torch.manual_seed(0)
    model = build_model("baseline", 10).eval()
    with_relu = copy.deepcopy(model)
    with_relu.backbone.stem_relu = True
    x = torch.randn(2, 3, 64, 32)
    assert (model.backbone.stem(x) < 0).any()  # the original's stem: no ReLU before the max-pool
    assert (with_relu.backbone.stem(x) >= 0).all()
    assert build_model("baseline", 10, stem_relu=True).backbone.stem_relu


def test_head_initialisation_and_baseline_mean():
    torch.manual_seed(0)
    model = build_model("baseline", 1000).eval()
    assert not model.head.bn.bias.requires_grad and torch.equal(model.head.bn.bias, torch.zeros(2048))
    assert model.head.classifier.bias is None
    assert 0.0009 < model.head.classifier.weight.std().item() < 0.0011
    model.head.bn.running_mean.normal_()
    model.head.bn.running_var.uniform_(0.5, 2)
    clips = torch.randn(2, 4, 3, 64, 32)
    with torch.no_grad():
        per_frame = model.head.bn(model.backbone(clips.flatten(0, 1)).mean((2, 3)))  # (B·T, 2048)
        # The original baseline averages per-frame BN features ("FPL mean"); BN in eval is affine, so equal.
        torch.testing.assert_close(model(clips), per_frame.view(2, 4, -1).mean(1), rtol=1e-4, atol=1e-5)


BAD_OPTIONS = [
    (("resnet", 10), {}, "arch='resnet' is not valid; use one of 'baseline', 'nvan', 'ste_nvan'"),
    (("nvan", 0), {}, "num_classes=0 is not valid"),
    (("nvan", 10), {"attention": "flash"}, "attention='flash' is not valid; use one of 'fused', 'reference'"),
    (("nvan", 10), {"stem_relu": "yes"}, "stem_relu='yes' is not valid"),
    (("nvan", 10), {"nl_positions": [2, 3]}, "nl_positions=.* use a dict"),
    (("nvan", 10), {"nl_positions": {"layer5": [0]}}, "keys must be among layer1, layer2, layer3, layer4"),
    (("nvan", 10), {"nl_positions": {"layer2": [4]}}, "layer2 indices must be distinct integers in 0..3"),
    (("nvan", 10), {"nl_positions": {"layer3": [1, 1]}}, "layer3 indices must be distinct"),
    (("ste_nvan", 10), {"stripes": 0}, "stripes=0 is not valid"),
    (("ste_nvan", 10), {"temporal_attention": "all"}, "temporal_attention='all' is not valid; use one of 'pair'"),
    (("nvan", 10), {"temporal_attention": "pair"}, "applies to ste_nvan only"),
    (("baseline", 10), {"nl_positions": {"layer2": [3]}}, "the baseline has no non-local blocks"),
    (("baseline", 10), {"stripes": 16}, "stripes=16 is not valid; the baseline has no non-local blocks"),
    (("nvan", 10), {"pretrained": 1}, "pretrained=1 is not valid"),
]


@pytest.mark.parametrize("args, kwargs, message", BAD_OPTIONS)
def test_bad_options_raise_clear_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(*args, **kwargs)


def test_bad_clips_raise_clear_errors():
    ste = build_model("ste_nvan", 10, stripes=4)
    with pytest.raises(ValueError, match="ste_nvan needs a clip length T that is a multiple of 4.*got T=6"):
        ste(torch.randn(2, 6, 3, 64, 32))
    default_stripes = build_model("ste_nvan", 10)  # 16 stripes; 64×32 frames give 8×4 maps at layer2
    with pytest.raises(ValueError, match=r"layer2\.2: stripes=16 must divide the feature height 8"):
        default_stripes(torch.randn(2, 4, 3, 64, 32))
    with pytest.raises(ValueError, match=r"expected clips of shape \(B, T, 3, H, W\)"):
        ste(torch.randn(8, 3, 64, 32))
    layer4_pairs = build_model("ste_nvan", 10, stripes=2, nl_positions={"layer4": [2]})
    with pytest.raises(ValueError, match="layer4 sees 1 frames per clip for T=4"):
        layer4_pairs(torch.randn(2, 4, 3, 64, 32))


def test_pretrained_from_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet50()
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")  # with fc.*, as torchvision ships it
    model = build_model("nvan", 10, pretrained=tmp_path / "resnet50.pth")
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name


def test_pretrained_wrong_file_names_the_keys(tmp_path):
    state = build_model("baseline", 10).backbone.state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"missing keys \[layer1\.0\.conv1\.weight\]; unexpected keys "
                                         r"\[extra\.weight\]"):
        build_model("baseline", 10, pretrained=str(tmp_path / "wrong.pth"))
    with pytest.raises(FileNotFoundError, match="neither 'imagenet' nor an existing file"):
        build_model("baseline", 10, pretrained=str(tmp_path / "absent.pth"))


def test_pretrained_imagenet_offline_says_how_to_get_the_file(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"download https://download\.pytorch\.org/models/resnet50-0676ba61\.pth"
                                           r".*pretrained='/path/to/resnet50-0676ba61\.pth'"):
        build_model("ste_nvan", 10, pretrained="imagenet")
