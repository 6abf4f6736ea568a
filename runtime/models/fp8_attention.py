"""FP8 attention core for the MMDiT (`torch-fp8` backend, opt-in): q, k, v quantized per tensor to
E4M3, both attention products on FP8 tensor cores (runtime/models/attention_kernel.py on CUDA).

Scales, with no calibration pass:
* q and k come out of the MMDiT's QK RMS-norm, so every element is bounded: |x_i| <= sqrt(D) *
  max|w| (a unit-RMS vector of D elements has no element above sqrt(D)). That bound is the static
  amax; E4M3 is floating point, so the headroom costs no precision. Without a QK norm the amax is
  taken per call.
* v: amax per call (one fused reduction under torch.compile).
* P = softmax numerators, scaled to (0, 448] inside the kernel.

`torch.ops.sd35trt.fp8_attention` is an opaque custom op for torch.compile (inductor fuses the
quantization and the transpose of V into the producers). On CPU the same op runs an fp32
emulation of the kernel's arithmetic (the reference the CUDA kernel is tested against).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import E4M3, E4M3_MAX, to_e4m3

LOG2E = 1.4426950408889634
KERNEL_CONFIG = dict(block_m=128, block_n=128, num_warps=4, num_stages=3, fast_exp=True)  # fastest on H100


@torch.library.custom_op("sd35trt::fp8_attention", mutates_args=(), device_types="cuda")
def fp8_attention(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, qk_scale: torch.Tensor,
                  v_scale: torch.Tensor) -> torch.Tensor:
    """q8, k8: [B, N, H, D] e4m3; vt8: [B, H, D, >=N] e4m3; qk_scale = s_q s_k log2(e)/sqrt(D) and
    v_scale = s_v (0-dim fp32). Returns softmax(q k^T / sqrt(D)) v as [B, N, H, D] bf16."""
    from .attention_kernel import fp8_attention_fwd

    out = torch.empty(q8.shape, dtype=torch.bfloat16, device=q8.device)  # [B, N, H, D]
    return fp8_attention_fwd(q8, k8, vt8, qk_scale, v_scale, out, **KERNEL_CONFIG)


@fp8_attention.register_fake
def _(q8, k8, vt8, qk_scale, v_scale):
    return torch.empty(q8.shape, dtype=torch.bfloat16, device=q8.device)


@fp8_attention.register_kernel("cpu")
def _(q8, k8, vt8, qk_scale, v_scale):
    return emulate(q8, k8, vt8, qk_scale, v_scale)


def emulate(q8, k8, vt8, qk_scale, v_scale) -> torch.Tensor:
    """The kernel's arithmetic in fp32 torch: base-2 softmax with P scaled to (0, 448] and rounded
    to E4M3 before the product with V, row sums from the unrounded P."""
    n = q8.shape[1]
    q, k = q8.float().transpose(1, 2), k8.float().transpose(1, 2)  # [B, H, N, D]
    v = vt8[..., :n].float().transpose(2, 3)  # [B, H, N, D]
    s = q @ k.transpose(2, 3) * qk_scale  # [B, H, N, N], log2 units
    p = torch.exp2(s - s.amax(-1, keepdim=True) + math.log2(E4M3_MAX))
    p_mm = p.to(E4M3) if vt8.dtype == E4M3 else (p / E4M3_MAX).to(torch.bfloat16) * E4M3_MAX
    out = (p_mm.float() @ v) * (v_scale / p.sum(-1, keepdim=True))  # [B, H, N, D]
    return out.transpose(1, 2).to(torch.bfloat16)  # [B, N, H, D]


def quantize(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x / (amax/448) rounded to E4M3, and the fp32 scale amax/448."""
    scale = amax.float().clamp_min(1e-12) / E4M3_MAX
    return to_e4m3(x, scale), scale


class FP8Attention(nn.Module):
    """Drop-in for the MMDiT attention core: (q, k, v) [B, N, H, D] bf16 -> [B, N, H, D] bf16."""

    def __init__(self, q_amax: float | None = None, k_amax: float | None = None, pv_fp8: bool = True) -> None:
        super().__init__()
        self.pv_fp8 = pv_fp8  # False: FP8 q k^T only, P v in bf16 (more precise, slower)
        bound = (q_amax, k_amax)
        self.static = all(a is not None for a in bound)
        amax = torch.tensor(bound if self.static else (0.0, 0.0), dtype=torch.float32)
        self.register_buffer("qk_amax", amax, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, d = q.shape[1], q.shape[-1]
        qa, ka = (self.qk_amax[0], self.qk_amax[1]) if self.static else (q.abs().amax(), k.abs().amax())
        q8, sq = quantize(q, qa)
        k8, sk = quantize(k, ka)
        vt = F.pad(v.permute(0, 2, 3, 1), (0, (-n) % 16))  # [B, H, D, N16], N contiguous
        if self.pv_fp8:
            vt8, sv = quantize(vt, v.abs().amax())
        else:
            vt8, sv = vt.contiguous(), torch.ones((), dtype=torch.float32, device=v.device)
        return torch.ops.sd35trt.fp8_attention(q8, k8, vt8, sq * sk * (LOG2E / math.sqrt(d)), sv)


def rms_bound(norms: list[nn.Module], head_dim: int) -> float:
    """Largest |element| the given RMS norms can output: sqrt(D) * max |weight|."""
    return math.sqrt(head_dim) * max(float(m.weight.detach().abs().max()) for m in norms)


def use_fp8_attention(model: nn.Module, enabled: bool = True, pv_fp8: bool = True) -> int:
    """Give every attention of `model` the FP8 core (static q/k scales from its QK norms when it
    has them), or back torch's SDPA when not `enabled`; returns how many attentions were set."""
    from .mmdit import sdpa

    count = 0
    for mod in model.modules():
        if hasattr(mod, "core") and hasattr(mod, "heads"):
            if not enabled:
                if isinstance(mod.core, nn.Module):
                    delattr(mod, "core")  # a registered child: nn.Module refuses a plain function over it
                mod.core = sdpa
                count += 1
                continue
            head_dim = mod.head_dim
            qn = [getattr(mod, n) for n in ("norm_q", "norm_added_q") if hasattr(mod, n)]
            kn = [getattr(mod, n) for n in ("norm_k", "norm_added_k") if hasattr(mod, n)]
            qa, ka = (rms_bound(qn, head_dim), rms_bound(kn, head_dim)) if qn else (None, None)
            device = next(iter([*mod.parameters(), *mod.buffers()])).device
            mod.core = FP8Attention(qa, ka, pv_fp8).to(device)
            count += 1
    return count
