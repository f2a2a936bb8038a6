"""ResNet-50 backbone: torchvision's layout and parameter names, last stride 1 (design §3).

The names are torchvision's `resnet50` minus `fc`, so ImageNet weights load with strict=True. Frames run as a 2-D
batch (B·T, 3, H, W). The clip model (video_net.py) walks the bottlenecks itself, because non-local blocks and
temporal max-pools sit between them; `LAYERS` and `LAYER_DEPTHS` are the data it walks with.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

LAYERS = ("layer1", "layer2", "layer3", "layer4")
LAYER_DEPTHS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}  # bottlenecks per stage
LAYER_CHANNELS = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}  # output channels
FEATURE_DIM = LAYER_CHANNELS["layer4"]


class ResNet50(nn.Module):
    """ResNet-50 without avgpool/fc; `last_stride=1` keeps layer4 at 1/16 of the input (16×8 for 256×128).

    `stem_relu=False` reproduces the original STE-NVAN stem, which has no ReLU between bn1 and maxpool (the
    published models were trained that way); `True` restores torchvision's ReLU. Either way the parameters are
    the same.
    """

    def __init__(self, last_stride: int = 1, stem_relu: bool = False):
        super().__init__()
        self.stem_relu = stem_relu
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._inplanes = 64
        self.layer1 = self._make_layer(64, LAYER_DEPTHS["layer1"], stride=1)
        self.layer2 = self._make_layer(128, LAYER_DEPTHS["layer2"], stride=2)
        self.layer3 = self._make_layer(256, LAYER_DEPTHS["layer3"], stride=2)
        self.layer4 = self._make_layer(512, LAYER_DEPTHS["layer4"], stride=last_stride)
        # torchvision's initialisation; replaced by ImageNet weights when `pretrained` is given.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self._inplanes, out, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        # Stride on the 3×3 conv (torchvision's "V1.5" bottleneck), as in the original code.
        layers = [Bottleneck(self._inplanes, planes, stride, downsample)]
        self._inplanes = out
        layers += [Bottleneck(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B·T, 3, H, W) -> (B·T, 64, H/4, W/4)."""
        x = self.bn1(self.conv1(x))
        if self.stem_relu:
            x = self.relu(x)
        return self.maxpool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain per-frame forward (no non-local blocks): (N, 3, H, W) -> (N, 2048, H/16, W/16)."""
        x = self.stem(x)
        for name in LAYERS:
            x = getattr(self, name)(x)
        return x
