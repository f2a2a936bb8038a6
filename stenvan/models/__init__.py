"""Clip models for video re-id: ResNet-50 baseline, NVAN, STE-NVAN (design §3).

`build_model(arch, num_classes, **options)` is the entry point; `load_original_checkpoint` imports the models
released by the original project (see docs/checkpoint_mapping.md); `from_config.build_model_from_config` builds
the model a training config describes.
May import: torch, torchvision and stenvan.config; nothing else of stenvan.
"""

from stenvan.models.convert import convert_original_state_dict, load_original_checkpoint
from stenvan.models.flops import flop_counter, forward_gflops
from stenvan.models.non_local import NonLocalBlock
from stenvan.models.video_net import ARCHS, VideoReIDNet, build_model

__all__ = ["ARCHS", "NonLocalBlock", "VideoReIDNet", "build_model", "convert_original_state_dict",
           "flop_counter", "forward_gflops", "load_original_checkpoint"]
