"""Fused FP8 GEMM epilogues for the MMDiT on sm90, written with quack's `@gemm_epilogue` (CuTe DSL).

Importing this module needs `quack-kernels` (a dependency of flash-attn-4, the `hopper` extra) and a
CUDA device; nothing else in the runtime imports it unless asked. Each epilogue is a plain function
over the fp32 accumulator of one FP8 GEMM (`acc` = x_q @ w_q^T, per-tensor scales folded into
`alpha` = s_x * s_w):

* `linear_epi`: D = alpha*acc + bias (bf16): what `torch._scaled_mm(..., bias=)` computes.
* `gelu_quant_epi`: D = e4m3(gelu_tanh(alpha*acc + bias) / s_next), saturating at +-448: the FF1 GEMM, its GELU
  and the FF2 input quantization in one kernel (the bf16 FF1 output is never written).
* `qkv_norm_epi`: the fused QKV GEMM with the q/k RMS-norm: D = x * (rstd * qk_w + v_one), x =
  alpha*acc + bias, rstd per (row, head) from a prepass over x^2 (quack's HeadRstd); `qk_w` holds
  the norm weights over q/k columns and 0 over v, `v_one` 1 over v and 0 over q/k.
* `gated_delta_epi`: the delta gate*(alpha*acc + bias) that `add_to_output` adds onto the residual
  stream in place (D += delta through TMA reduce-add): out-projection / FF2 plus the gated residual.
"""

from __future__ import annotations

from quack.activation import gelu_tanh_approx
from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.head_rmsnorm import HeadRstd
from quack.epilogue.ops import RowVecLoad

QK_EPS = 1e-6  # SD3.5's q/k RMSNorm eps; HeadRstd bakes it into the kernel


@gemm_epilogue(ops={"bias": RowVecLoad("bias")})  # pinned: a [1, N] bias is ambiguous when M == N
def linear_epi(acc, alpha, bias):
    return {"D": acc * alpha + bias}


@gemm_epilogue(ops={"bias": RowVecLoad("bias")})
def gelu_quant_epi(acc, alpha, bias, inv_s):
    return {"D": gelu_tanh_approx(acc * alpha + bias) * inv_s}  # the E4M3 store saturates (cvt .satfinite)


def _qkv_squares(acc, alpha, bias):
    x = acc * alpha + bias
    return {"qk": x * x}


@gemm_epilogue(ops={"qk": HeadRstd("qk", eps=QK_EPS), "bias": RowVecLoad("bias"), "qk_w": RowVecLoad("qk_w"),
                    "v_one": RowVecLoad("v_one")}, prepass=_qkv_squares, prepass_outs=("qk",))
def qkv_norm_epi(acc, alpha, bias, qk_w, v_one, qk):
    x = acc * alpha + bias
    return {"D": x * (qk * qk_w + v_one)}


@gemm_epilogue(ops={"bias": RowVecLoad("bias"), "gate": RowVecLoad("gate")})
def gated_delta_epi(acc, alpha, bias, gate):
    return {"D": gate * (acc * alpha + bias)}
