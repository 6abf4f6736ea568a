"""FP8 attention core (opt-in experiment of the torch-fp8 backend) and the sigmoid-form GELU.

On CPU the custom op runs the fp32 emulation of the kernel's arithmetic; the GPU test checks the
Triton kernel itself against that emulation (`pytest -m gpu` on the device machine).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sd35trt.export.tiny_model import TINY_TRANSFORMERS
from sd35trt.runtime.models.fp8_attention import (LOG2E, FP8Attention, emulate, quantize, rms_bound,
                                                  use_fp8_attention)
from sd35trt.runtime.models.mmdit import MMDiT, gelu_tanh, gelu_tanh_sigmoid, sdpa, use_sigmoid_gelu


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _qkv(b=2, n=150, h=3, d=64, logit_std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(b, n, h, d, generator=g), dim=-1) * math.sqrt(d * logit_std) for _ in range(2))
    v = torch.randn(b, n, h, d, generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()  # [B, N, H, D]


def test_fp8_core_is_close_to_sdpa_but_not_equal() -> None:
    q, k, v = _qkv()
    ref = sdpa(q.float(), k.float(), v.float())
    out = FP8Attention()(q, k, v)  # dynamic scales
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert _cos(out, ref) >= 0.995
    assert (out.float() - ref).abs().max() > 1e-3  # really quantized, not a pass-through


def test_bf16_pv_variant_is_more_precise() -> None:
    q, k, v = _qkv(seed=1)
    ref = sdpa(q.float(), k.float(), v.float())
    full = FP8Attention(pv_fp8=True)(q, k, v)
    qk_only = FP8Attention(pv_fp8=False)(q, k, v)
    assert _cos(qk_only, ref) > _cos(full, ref) >= 0.995


def test_emulation_matches_float_softmax_when_nothing_is_rounded() -> None:
    """With P and V exactly representable (one-hot attention, V in E4M3), the emulation is exact."""
    n, d = 32, 64
    q = torch.zeros(1, n, 1, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, n, 1, d)
    k[0, 5, 0, 0] = 1.0  # every query attends to key 5 with logit 30/sqrt(d) scale below
    v = torch.arange(n * d, dtype=torch.float32).reshape(1, n, 1, d) % 7 - 3  # small integers: exact in E4M3
    q8, sq = quantize(q, torch.tensor(1.0))
    k8, sk = quantize(k, torch.tensor(1.0))
    vt8, sv = quantize(v.permute(0, 2, 3, 1), torch.tensor(448.0))  # scale 1
    qk = sq * sk * 1e4  # huge logit gap: softmax is one-hot in float32
    out = emulate(q8, k8, vt8, qk, sv).float()
    assert torch.equal(out[0, :, 0], v[0, 5, 0].expand(n, d))


def test_static_rms_bound_never_clips() -> None:
    """After an RMS norm no element exceeds sqrt(D) * max|w|, the static amax of q and k."""
    model = MMDiT(TINY_TRANSFORMERS["large"]).eval()
    attn = model.transformer_blocks[0].attn
    torch.nn.init.normal_(attn.norm_q.weight, 1.0, 0.3)
    x = torch.zeros(4, 10, attn.heads, attn.head_dim)
    x[..., 0] = 5.0  # all energy in one element: the worst case
    bound = rms_bound([attn.norm_q], attn.head_dim)
    with torch.no_grad():
        y = attn.norm_q(x)
    assert float(y.abs().max()) <= bound * (1 + 1e-6)
    assert float(y.abs().max()) >= 0.99 * bound * float(attn.norm_q.weight[0].abs()) / float(attn.norm_q.weight.abs().max())


@pytest.mark.parametrize("family", ["large", "medium"])
def test_mmdit_with_fp8_attention_and_back(family: str) -> None:
    torch.manual_seed(0)
    model = MMDiT(TINY_TRANSFORMERS[family]).eval()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 16, 16, 16, generator=g), torch.tensor([900.0, 300.0]),
            torch.randn(2, 77 + 24, 96, generator=g), torch.randn(2, 80, generator=g))
    with torch.no_grad():
        ref = model(*args)
        n = use_fp8_attention(model)
        fp8 = model(*args)
        assert n == sum(hasattr(m, "core") for m in model.modules()) > 0
        use_fp8_attention(model, enabled=False)
        back = model(*args)
    assert torch.equal(back, ref)
    assert 0.99 <= _cos(fp8, ref) < 1.0


def test_sigmoid_gelu_is_the_tanh_gelu() -> None:
    x = torch.linspace(-12, 12, 100_001)
    assert (gelu_tanh(x) - gelu_tanh_sigmoid(x)).abs().max() <= 2e-6
    xb = x.bfloat16()
    assert (gelu_tanh(xb).float() - gelu_tanh_sigmoid(xb).float()).abs().max() <= 2 ** -6
    model = MMDiT(TINY_TRANSFORMERS["medium"]).eval()
    use_sigmoid_gelu(model)
    assert all(m.act is gelu_tanh_sigmoid for m in model.modules() if hasattr(m, "act"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton FP8 attention kernel needs a CUDA GPU (sm89+)")
@pytest.mark.parametrize("fast_exp", [True, False])
@pytest.mark.parametrize("pv_fp8", [True, False])
def test_triton_kernel_matches_its_emulation(fast_exp: bool, pv_fp8: bool) -> None:
    pytest.importorskip("triton", reason="the kernel is written in Triton")
    from sd35trt.runtime.models.attention_kernel import fp8_attention_fwd

    q, k, v = (t.cuda() for t in _qkv(b=2, n=333 + 1024, h=4, d=64, logit_std=2.0))  # N not a tile multiple
    n = q.shape[1]
    q8, sq = quantize(q, q.float().abs().amax())
    k8, sk = quantize(k, k.float().abs().amax())
    vt = F.pad(v.permute(0, 2, 3, 1), (0, (-n) % 16))
    vt8, sv = quantize(vt, v.float().abs().amax()) if pv_fp8 else (vt.contiguous(), torch.ones((), device="cuda"))
    qk = sq * sk * (LOG2E / math.sqrt(64))
    out = fp8_attention_fwd(q8, k8, vt8, qk, sv, torch.empty_like(q), fast_exp=fast_exp)
    em = emulate(q8, k8, vt8, qk, sv)
    ref = sdpa(q.float(), k.float(), v.float())
    assert _cos(out, em) >= 0.999  # online softmax rounds P per key block, the emulation per row
    assert _cos(out, ref) >= 0.995
