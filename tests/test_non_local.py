"""The non-local block: fused (SDPA) vs reference attention, identity at init, locality, layouts, FLOPs."""

import copy

import pytest
import torch

from stenvan.models.flops import flop_counter
from stenvan.models.non_local import NonLocalBlock

# NVAN's two attention shapes for one 8-frame 256×128 clip: (channels, frames, height, width).
NVAN_LAYER2 = (512, 8, 32, 16)  # 4,096 tokens, d = 256
NVAN_LAYER3 = (1024, 8, 16, 8)  # 1,024 tokens, d = 512


def _trained_like(block: NonLocalBlock) -> NonLocalBlock:
    """A block that is not the identity: a fresh block's zero BN would hide every attention error."""
    torch.nn.init.normal_(block.bn.weight)
    torch.nn.init.normal_(block.bn.bias)
    block.bn.running_mean.normal_(0, 0.1)
    block.bn.running_var.uniform_(0.5, 1.5)
    return block.eval()


def _forward_backward(block, x, grad_out, dtype):
    """Attention branch z - x and the gradients of x and every parameter, as fp32."""
    block = copy.deepcopy(block).to(dtype)
    x = x.to(dtype).requires_grad_(True)
    z = block(x, group_frames=x.shape[0])  # one clip: all frames attend together (NVAN)
    delta = (z - x).float()  # the residual would dominate z and mask errors in the attention branch
    (delta * grad_out).sum().backward()
    grads = {"x": x.grad.float(), **{n: p.grad.float() for n, p in block.named_parameters()}}
    return delta, grads


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _both_modes(shape, dtype, seed=0):
    torch.manual_seed(seed)
    channels, frames, height, width = shape
    fused = _trained_like(NonLocalBlock(channels, attention="fused"))
    reference = copy.deepcopy(fused)
    reference.attention = "reference"
    x = torch.randn(frames, channels, height, width)
    grad_out = torch.randn_like(x)
    runs = [("fused", fused, dtype), ("reference", reference, dtype)]
    if dtype != torch.float32:
        runs.append(("fp32", reference, torch.float32))  # the ground truth for the low-precision runs
    return {mode: _forward_backward(block, x, grad_out, dt) for mode, block, dt in runs}


def _check_phi_bias(grads):
    # ∂L/∂b_φ is exactly 0: a key bias adds the same q·b_φ to every logit of a query and softmax ignores
    # shifts, so it is pure rounding noise; check it is negligible instead of comparing noise with noise.
    assert grads["phi.bias"].abs().max() < 1e-3 * grads["phi.weight"].abs().max()


@pytest.mark.parametrize("shape", [NVAN_LAYER2, NVAN_LAYER3], ids=["layer2", "layer3"])
def test_fused_matches_reference_fp32(shape):
    out = _both_modes(shape, torch.float32)
    (y_f, g_f), (y_r, g_r) = out["fused"], out["reference"]
    assert y_r.abs().max() > 0.1  # the branch is active, so the comparison means something
    assert _rel(y_f, y_r) < 1e-5
    for name in g_r:
        if name != "phi.bias":
            assert _rel(g_f[name], g_r[name]) < 1e-5, name
    _check_phi_bias(g_f)
    _check_phi_bias(g_r)


# bf16 keeps 8 significant bits: unit roundoff u = 2⁻⁸ ≈ 3.9e-3 per rounding. The unscaled logits θᵀφ reach
# |s| ≈ 20-30 at these shapes (std ≈ 5), so rounding q and k perturbs a logit by ≈ 2u|s| ≈ 0.1-0.2 and a softmax
# weight by that fraction; averaged over thousands of keys this leaves ≈ 1-3e-2 max-relative error in y against
# fp32 (measured 1.4-2.5e-2 for both paths, 2-4e-2 for gradients, which chain two such products). Hence 5e-2
# forward and 1e-1 gradients, fused vs reference; and the fused path must be no less accurate than the
# original's explicit one (it keeps logits and the softmax in fp32 inside the kernel).
BF16_FWD_TOL = 5e-2
BF16_GRAD_TOL = 1e-1


@pytest.mark.parametrize("shape", [NVAN_LAYER2, NVAN_LAYER3], ids=["layer2", "layer3"])
def test_fused_matches_reference_bf16(shape):
    out = _both_modes(shape, torch.bfloat16)
    (y_f, g_f), (y_r, g_r), (y_32, g_32) = out["fused"], out["reference"], out["fp32"]
    assert _rel(y_f, y_r) < BF16_FWD_TOL
    assert _rel(y_f, y_32) <= 1.5 * _rel(y_r, y_32)
    for name in g_r:
        if name != "phi.bias":
            assert _rel(g_f[name], g_r[name]) < BF16_GRAD_TOL, name
            assert _rel(g_f[name], g_32[name]) <= 1.5 * _rel(g_r[name], g_32[name]) + 1e-3, name


@pytest.mark.parametrize("stripes", [None, 4])
@pytest.mark.parametrize("train", [True, False])
def test_fresh_block_is_identity(stripes, train):
    block = NonLocalBlock(64, stripes=stripes).train(train)
    x = torch.randn(4, 64, 8, 4)
    assert torch.equal(block(x, group_frames=4), x)


@pytest.mark.parametrize("stripes", [None, 4])
def test_attention_stays_within_groups(stripes):
    torch.manual_seed(0)
    block = _trained_like(NonLocalBlock(32, stripes=stripes))
    x = torch.randn(8, 32, 8, 4)  # two clips of four frames, or four pairs
    x_changed = x.clone()
    x_changed[2:4] += torch.randn(2, 32, 8, 4)  # second pair of the first clip
    pairs, changed = block(x, group_frames=2), block(x_changed, group_frames=2)
    assert torch.equal(pairs[:2], changed[:2]) and torch.equal(pairs[4:], changed[4:])
    clips, changed = block(x, group_frames=4), block(x_changed, group_frames=4)
    assert not torch.allclose(clips[:2], changed[:2])  # whole-clip attention does see the change
    assert torch.equal(clips[4:], changed[4:])


def test_stripe_output_is_constant_over_each_stripe():
    torch.manual_seed(0)
    block = _trained_like(NonLocalBlock(16, stripes=4))
    x = torch.zeros(2, 16, 8, 4)  # rows 2k, 2k+1 form stripe k
    delta = block(x, group_frames=2)
    assert torch.equal(delta, delta[:, :, ::2].repeat_interleave(2, dim=2)[..., :1].expand_as(delta))


@pytest.mark.parametrize("stripes", [None, 4])
def test_channels_last_gives_same_output_and_layout(stripes):
    torch.manual_seed(0)
    block = _trained_like(NonLocalBlock(32, stripes=stripes))
    x = torch.randn(4, 32, 8, 4)
    expected = block(x, group_frames=4)
    block_cl = copy.deepcopy(block).to(memory_format=torch.channels_last)
    out = block_cl(x.to(memory_format=torch.channels_last), group_frames=4)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert block(x, group_frames=4).is_contiguous()  # and NCHW stays NCHW


def test_fused_and_reference_count_the_same_flops():
    # FlopCounterMode alone counts the CPU's fused kernel as 0; flop_counter adds its formula.
    torch.manual_seed(0)
    forward, backward = {}, {}
    for mode in ("fused", "reference"):
        block = NonLocalBlock(64, attention=mode)
        x = torch.randn(4, 64, 8, 4, requires_grad=True)
        with flop_counter() as counter:
            z = block(x, group_frames=4)
        forward[mode] = counter.get_total_flops()
        with flop_counter() as counter:
            z.sum().backward()
        backward[mode] = counter.get_total_flops()
    tokens, d = 4 * 8 * 4, 32
    qk_flops = 2 * tokens * tokens * d  # one (N, d) x (d, N) matmul, 2 flops per multiply-add
    assert forward["fused"] == forward["reference"] > 2 * qk_flops  # q kᵀ and attn v, plus the projections
    # The fused backward recomputes q kᵀ instead of keeping the (N, N) map: exactly one matmul more.
    assert backward["fused"] == backward["reference"] + qk_flops


def test_bad_block_options_raise_clear_errors():
    with pytest.raises(ValueError, match="attention='flash' is not valid; use one of 'fused', 'reference'"):
        NonLocalBlock(32, attention="flash")
    with pytest.raises(ValueError, match="stripes=0 is not valid"):
        NonLocalBlock(32, stripes=0)
    block = NonLocalBlock(32, stripes=3, name="layer3.4")
    with pytest.raises(ValueError, match=r"layer3\.4: stripes=3 must divide the feature height 8"):
        block(torch.randn(2, 32, 8, 4), group_frames=2)
    with pytest.raises(ValueError, match="6 frames cannot be split into groups of 4"):
        NonLocalBlock(32)(torch.randn(6, 32, 8, 4), group_frames=4)
