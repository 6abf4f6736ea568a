"""FP8 (E4M3) flash attention forward for Hopper-class GPUs, in Triton (imported only on CUDA).

One program computes BLOCK_M query rows of one (batch, head) against every key, online softmax in
base 2. Both matrix products run on FP8 tensor cores with fp32 accumulation:

    S = (q8 @ k8^T) * qk_scale                    # log2 units; qk_scale = s_q s_k log2(e) / sqrt(D)
    P = 2^(S - rowmax + log2 448)                 # in (0, 448]: P is already in E4M3's range
    O = (P8 @ v8) * s_v / rowsum(P)

The exponentials can run as packed half-precision `ex2.approx.f16x2` (two per SFU instruction):
with D = 64 the softmax, not the tensor cores, bounds this kernel, and P is rounded to E4M3 right
after, so f16 exponentials lose nothing that matters. V comes transposed ([B, H, D, >= N], row
stride a multiple of 16 for vector loads) because FP8 tensor-core products want both operands
K-major; q/k/out stay in the projection's [B, N, H, D] layout, so no transposes around the call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2_E4M3_MAX = tl.constexpr(8.807354922057604)  # log2(448)


@triton.jit
def _exp2(x, FAST_EXP: tl.constexpr):
    if FAST_EXP:
        return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                         dtype=tl.float16, is_pure=True, pack=2)
    else:
        return tl.math.exp2(x)


@triton.jit
def _key_block(acc, l_i, m_i, q, k_ptrs, vt_ptrs, start, seq, qk_scale, offs_n, stride_kn,
               MASK: tl.constexpr, FAST_EXP: tl.constexpr, PV_FP8: tl.constexpr):
    cols = start + offs_n
    if MASK:
        k = tl.load(k_ptrs + start * stride_kn, mask=cols[None, :] < seq, other=0.0)  # [D, BN]
    else:
        k = tl.load(k_ptrs + start * stride_kn)
    s = tl.dot(q, k) * qk_scale  # [BM, BN] fp32, log2 units
    if MASK:
        s = tl.where(cols[None, :] < seq, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = _exp2(s - (m_new[:, None] - LOG2_E4M3_MAX), FAST_EXP)  # [BM, BN] in (0, 448]
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    if MASK:
        vt = tl.load(vt_ptrs + start, mask=cols[None, :] < seq, other=0.0)  # [D, BN]
    else:
        vt = tl.load(vt_ptrs + start)
    if PV_FP8:
        acc = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), acc * alpha[:, None])  # [BM, D]
    else:  # V in bf16, P scaled back to (0, 1] (probe of the precision/speed trade)
        acc = tl.dot((p.to(tl.float32) * (1.0 / 448.0)).to(tl.bfloat16), tl.trans(vt), acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _fp8_attention_fwd(Q, K, VT, O, QK_SCALE, V_SCALE, seq, heads,
                       stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                       stride_vb, stride_vh, stride_vd, stride_ob, stride_on, stride_oh,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       FAST_EXP: tl.constexpr, PV_FP8: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=offs_m[:, None] < seq, other=0.0)  # [BM, D] e4m3
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]  # [D, BN]
    vt_ptrs = VT + b * stride_vb + h * stride_vh + offs_d[:, None] * stride_vd + offs_n[None, :]  # [D, BN]
    qk_scale = tl.load(QK_SCALE)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full = (seq // BLOCK_N) * BLOCK_N
    for start in range(0, full, BLOCK_N):
        acc, l_i, m_i = _key_block(acc, l_i, m_i, q, k_ptrs, vt_ptrs, start, seq, qk_scale, offs_n,
                                   stride_kn, False, FAST_EXP, PV_FP8)
    if full < seq:
        acc, l_i, m_i = _key_block(acc, l_i, m_i, q, k_ptrs, vt_ptrs, full, seq, qk_scale, offs_n,
                                   stride_kn, True, FAST_EXP, PV_FP8)
    if PV_FP8:
        out = acc * (tl.load(V_SCALE) / l_i)[:, None]
    else:
        out = acc * (tl.load(V_SCALE) * 448.0 / l_i)[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < seq)


def fp8_attention_fwd(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, qk_scale: torch.Tensor,
                      v_scale: torch.Tensor, out: torch.Tensor, block_m: int = 128, block_n: int = 128,
                      num_warps: int = 8, num_stages: int = 3, fast_exp: bool = True) -> torch.Tensor:
    """q8, k8: [B, N, H, D] e4m3 (D contiguous); vt8: [B, H, D, >=N] e4m3 or bf16 (N contiguous; bf16
    gives an FP8 q k^T with a bf16 P v, v_scale then the factor applied to V);
    qk_scale, v_scale: 0-dim fp32 on the device; out: [B, N, H, D] bf16, written and returned."""
    b, n, h, d = q8.shape
    grid = (triton.cdiv(n, block_m), b * h)
    _fp8_attention_fwd[grid](
        q8, k8, vt8, out, qk_scale, v_scale, n, h,
        q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        vt8.stride(0), vt8.stride(1), vt8.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, FAST_EXP=fast_exp, PV_FP8=vt8.dtype != torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages)
    return out
