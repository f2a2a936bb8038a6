"""Importing the original STE-NVAN checkpoints.

No released .pth file is available offline, so the test rebuilds the original's module tree with its parameter
names, shapes and forward (net/models.py `CNN` -> `Resnet50_NL` / `Resnet50_s1` -> net/resnet.py
`ResNet_Video_nonlocal` / `ResNet_Video_nonlocal_stripe_hr` / `ResNet`, `NonLocalBlock` /
`Stripe_NonLocalBlock`, wrapped in nn.DataParallel as their training scripts saved it), written here from a
reading of their public code. Its state dict is converted, loaded strictly, and the outputs must match.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stenvan.models import build_model, convert_original_state_dict, load_original_checkpoint
from stenvan.models.backbone import ResNet50

DEPTHS = [3, 4, 6, 3]


class OriginalNonLocal(nn.Module):
    """Their NonLocalBlock (stripes=None) / Stripe_NonLocalBlock: Conv3d θ, φ, g, W = [Conv3d, BatchNorm3d]."""

    def __init__(self, channels, stripes=None):
        super().__init__()
        self.inter, self.stripes = channels // 2, stripes
        self.g = nn.Conv3d(channels, self.inter, kernel_size=1)
        self.W = nn.Sequential(nn.Conv3d(self.inter, channels, kernel_size=1), nn.BatchNorm3d(channels))
        nn.init.constant_(self.W[1].weight, 0)
        nn.init.constant_(self.W[1].bias, 0)
        self.theta = nn.Conv3d(channels, self.inter, kernel_size=1)
        self.phi = nn.Conv3d(channels, self.inter, kernel_size=1)

    def forward(self, x):  # (b, c, t, h, w)
        b, c, t, h, w = x.shape
        src = x
        if self.stripes:
            s = self.stripes
            src = F.adaptive_avg_pool2d(x.reshape(b * c * t, s, h // s, w), 1).reshape(b, c, t, s, 1)
        g = self.g(src).reshape(b, self.inter, -1).permute(0, 2, 1)
        theta = self.theta(src).reshape(b, self.inter, -1).permute(0, 2, 1)
        phi = self.phi(src).reshape(b, self.inter, -1)
        y = torch.matmul(F.softmax(torch.matmul(theta, phi), dim=-1), g)
        y = y.permute(0, 2, 1).contiguous().reshape(b, self.inter, *src.shape[2:])
        w_y = self.W(y)
        if self.stripes:
            w_y = w_y.repeat(1, 1, 1, 1, h // self.stripes * w).reshape(b, c, t, h, w)
        return w_y + x


class OriginalVideoBackbone(nn.Module):
    """ResNet_Video_nonlocal (hr=False) and ResNet_Video_nonlocal_stripe_hr (hr=True, stripes)."""

    def __init__(self, non_layers, stripes=None, hr=False):
        super().__init__()
        plain = ResNet50()  # conv1/bn1/layerK.i.* are torchvision's names in the original too
        self.conv1, self.bn1, self.maxpool = plain.conv1, plain.bn1, plain.maxpool
        self.hr = hr
        for k in range(4):
            setattr(self, f"layer{k + 1}", nn.ModuleList(getattr(plain, f"layer{k + 1}")))
            channels = 256 * 2 ** k
            setattr(self, f"NL_{k + 1}", nn.ModuleList(
                [OriginalNonLocal(channels, stripes) for _ in range(non_layers[k])]))
            setattr(self, f"NL_{k + 1}_idx", sorted(DEPTHS[k] - (i + 1) for i in range(non_layers[k])))

    def forward(self, x):  # (B, T, 3, H, W) -> (B, C, T', h, w)
        B, T = x.shape[:2]
        x = self.maxpool(self.bn1(self.conv1(x.reshape(B * T, *x.shape[2:]))))  # no stem ReLU
        for k in range(1, 5):
            idx, blocks = getattr(self, f"NL_{k}_idx"), getattr(self, f"NL_{k}")
            for i, bottleneck in enumerate(getattr(self, f"layer{k}")):
                x = bottleneck(x)
                if i in idx:
                    _, C, H, W = x.shape
                    x = x.reshape(-1, 2 if self.hr else T, C, H, W).permute(0, 2, 1, 3, 4)
                    x = blocks[idx.index(i)](x)
                    x = x.permute(0, 2, 1, 3, 4).reshape(-1, C, H, W)
            if self.hr and k in (2, 3):
                _, C, H, W = x.shape
                x = torch.max(x.reshape(-1, 2, C, H, W), dim=1)[0]
                T //= 2
        _, C, H, W = x.shape
        return x.reshape(B, T, C, H, W).permute(0, 2, 1, 3, 4)


class OriginalFeatures(nn.Module):
    """Resnet50_NL (temporal='Done': AdaptiveAvgPool3d) or Resnet50_s1 (frames -> AdaptiveAvgPool2d)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.video = isinstance(backbone, OriginalVideoBackbone)
        self.avgpool = nn.AdaptiveAvgPool3d(1) if self.video else nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.avgpool(self.backbone(x)).reshape(x.shape[0], -1)


class OriginalCNN(nn.Module):
    def __init__(self, features, num_class):
        super().__init__()
        self.features = features
        self.bottleneck = nn.BatchNorm1d(2048)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(2048, num_class, bias=False)

    def forward(self, x):
        x = self.features(x)
        bn = self.bottleneck(x)
        return (x, self.classifier(bn)) if self.training else bn


def original_model(arch, num_class=7, stripes=16):
    if arch == "baseline":
        features = OriginalFeatures(ResNet50())
    else:
        hr = arch == "ste_nvan"
        features = OriginalFeatures(OriginalVideoBackbone([0, 2, 3, 0], stripes if hr else None, hr))
    return nn.DataParallel(OriginalCNN(features, num_class))  # the released files carry its "module." prefix


def _randomize_norms(model):
    """Non-trivial BN statistics and NL BN weights, so a wrong mapping cannot hide behind zeros and ones."""
    torch.manual_seed(123)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)
    return model


SMALL = {"baseline": {}, "nvan": {}, "ste_nvan": {"stripes": 4}}


@pytest.mark.parametrize("arch", ["nvan", "ste_nvan"])
def test_converted_video_models_give_identical_outputs(arch):
    torch.manual_seed(0)
    original = _randomize_norms(original_model(arch, stripes=4))
    new_state, report = convert_original_state_dict(original.state_dict(), arch)
    assert report["nl_positions"] == {"layer2": (2, 3), "layer3": (3, 4, 5)} and report["num_classes"] == 7
    ours = build_model(arch, report["num_classes"], nl_positions=report["nl_positions"], **SMALL[arch])
    ours.load_state_dict(new_state, strict=True)
    # float64: the train-mode BNNeck over a batch of 2 amplifies fp32 rounding, and the point here is the mapping.
    ours, original, clips = ours.double(), original.double(), torch.randn(2, 8, 3, 64, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(clips), original.eval()(clips), rtol=1e-9, atol=1e-9)
        # Train mode too (batch statistics everywhere, NL BNs over stripe tokens), on copies.
        ours_f, ours_logits = copy.deepcopy(ours).train()(clips)
        orig_f, orig_logits = copy.deepcopy(original).train()(clips)
    torch.testing.assert_close(ours_f, orig_f, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours_logits, orig_logits, rtol=1e-9, atol=1e-9)


def test_converted_baseline_gives_identical_eval_features():
    torch.manual_seed(0)
    original = _randomize_norms(original_model("baseline"))
    ours = load_original_checkpoint(original.state_dict(), "baseline")
    assert convert_original_state_dict(original.state_dict(), "baseline")[1]["nl_positions"] == {}
    clips = torch.randn(2, 4, 3, 64, 32)
    with torch.no_grad():
        # The original baseline runs frames and averages their BN features over T (evaluate.py, --temporal mean).
        frames = original.eval()(clips.flatten(0, 1)).view(2, 4, -1).mean(1)
        torch.testing.assert_close(ours.eval()(clips), frames, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["baseline", "nvan", "ste_nvan"])
def test_full_size_names_and_shapes_map_exactly(arch):
    with torch.device("meta"):
        original = original_model(arch, num_class=625)
        ours = build_model(arch, 625)
    new_state, report = convert_original_state_dict(original.state_dict(), arch)
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in new_state.items()} == expected  # no missing, unexpected or reshaped
    assert report["stripped_prefix"] == "module." and len(report["renamed"]) == len(expected)
    assert report["renamed"]["module.features.backbone.layer4.2.bn3.running_var"] == "backbone.layer4.2.bn3.running_var"
    assert report["renamed"]["module.bottleneck.bias"] == "head.bn.bias"
    assert report["renamed"]["module.classifier.weight"] == "head.classifier.weight"
    if arch != "baseline":
        assert report["renamed"]["module.features.backbone.NL_2.0.theta.weight"] == "non_local.layer2_2.theta.weight"
        assert report["renamed"]["module.features.backbone.NL_3.2.W.0.bias"] == "non_local.layer3_5.out.bias"
        assert report["renamed"]["module.features.backbone.NL_3.0.W.1.running_var"] == "non_local.layer3_3.bn.running_var"
        assert len(report["reshaped"]) == 5 * 4  # θ, φ, g, W.0 weights: Conv3d -> Conv2d


def test_load_original_checkpoint_from_file(tmp_path):
    torch.manual_seed(0)
    original = _randomize_norms(original_model("ste_nvan", stripes=4))
    torch.save(original.state_dict(), tmp_path / "STE_NVAN.pth")
    ours = load_original_checkpoint(tmp_path / "STE_NVAN.pth", "ste_nvan", stripes=4, attention="reference")
    clips = torch.randn(1, 4, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(clips), original.eval()(clips), rtol=1e-4, atol=1e-4)


def test_converter_rejects_what_it_does_not_know():
    state = original_model("nvan").state_dict()
    with pytest.raises(ValueError, match="holds non-local blocks in layer2, layer3: it is an NVAN or STE-NVAN"):
        convert_original_state_dict(state, "baseline")
    baseline = original_model("baseline").state_dict()
    with pytest.raises(ValueError, match="holds no non-local blocks.*looks like the baseline"):
        convert_original_state_dict(baseline, "nvan")
    with pytest.raises(ValueError, match=r"keys the original STE-NVAN models do not: module\.extra\.weight"):
        convert_original_state_dict({**state, "module.extra.weight": torch.zeros(1)}, "nvan")
    with pytest.raises(ValueError, match="mixes keys with and without the DataParallel 'module.' prefix"):
        convert_original_state_dict({**state, "classifier.weight": torch.zeros(1)}, "nvan")
    with pytest.raises(ValueError, match="arch='r50' is not valid"):
        convert_original_state_dict(state, "r50")
    unprefixed = {k[len("module."):]: v for k, v in state.items()}  # saved without DataParallel
    assert convert_original_state_dict(unprefixed, "nvan")[1]["stripped_prefix"] == ""


def test_checkpoint_without_num_batches_tracked_loads_strictly():
    # Files saved before PyTorch 0.4.1 lack these buffers; load_state_dict fills them for a metadata-less dict.
    state = {k: v for k, v in original_model("nvan").state_dict().items() if not k.endswith("num_batches_tracked")}
    model = load_original_checkpoint(state, "nvan")
    assert int(model.non_local["layer2_2"].bn.num_batches_tracked) == 0
