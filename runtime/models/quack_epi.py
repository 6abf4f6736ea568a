"""Fused FP8 GEMM epilogues for the MMDiT on sm90, written with quack's `@gemm_epilogue` (CuTe DSL).

Importing this module needs `quack-kernels` (a dependency of flash-attn-4, the `hopper` extra) and a
CUDA device; nothing else in the runtime imports it unless asked. Each epilogue is a plain function
over the fp32 accumulator of one FP8 GEMM (`acc` = x_q @ w_q^T, per-tensor scales folded into
`alpha` = s_x * s_w):

* `linear_epi`: D = alpha*acc + bias (bf16): what `torch._scaled_mm(..., bias=)` computes.
* `gelu_quant_epi`: D = e4m3(gelu_tanh(alpha*acc + bias) / s_next), saturating at +-448: the FF1 GEMM, its GELU
  and the FF2 input quantization in one kernel (the bf16 FF1 output is never written).
* `gated_delta_epi`: the delta gate*(alpha*acc + bias) that `add_to_output` adds onto the residual
  stream in place (D += delta through TMA reduce-add): out-projection / FF2 plus the gated residual.
"""

from __future__ import annotations

from quack.activation import gelu_tanh_approx
from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.ops import RowVecLoad


@gemm_epilogue(ops={"bias": RowVecLoad("bias")})  # pinned: a [1, N] bias is ambiguous when M == N
def linear_epi(acc, alpha, bias):
    return {"D": acc * alpha + bias}


@gemm_epilogue(ops={"bias": RowVecLoad("bias")})
def gelu_quant_epi(acc, alpha, bias, inv_s):
    return {"D": gelu_tanh_approx(acc * alpha + bias) * inv_s}  # the E4M3 store saturates (cvt .satfinite)


@gemm_epilogue(ops={"bias": RowVecLoad("bias"), "gate": RowVecLoad("gate")})
def gated_delta_epi(acc, alpha, bias, gate):
    return {"D": gate * (acc * alpha + bias)}
