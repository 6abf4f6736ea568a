"""All joint blocks' adaLN projections as one GEMM (`batch_adaln`, opt-in; issue 18).

Every block's `norm1.linear` and `norm1_context.linear` maps the same SiLU(temb) [B, D] to its
modulation vectors. With M = B (2 for a CFG pair) each of those GEMMs only reads its weight, so
76 weight-read-bound GEMMs (and 76 quantizations of the same tiny input) become one GEMM over
the concatenated weights. The math is the same: FP8 layers keep their E4M3 weights, per-layer
weight scales (applied per output column) and biases, and the input is quantized once with the
shared input scale (max calibration gives every one of them the same amax: they see one tensor).
The per-layer modules stay and their weights become views of the bank's (no extra memory), so
`batch_adaln` can be undone (`unbatch_adaln`) and the unbatched forward still runs. A model
with a bank cannot be saved with safetensors (shared storage): batch after any saving.
Measured compiled on the H200 (first 6 Large blocks, BENCHMARKS.md "Step fusions"): 2.0 % slower
than the per-block GEMMs, so it stays opt-in; eager, its outputs match them to 6e-6 relative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import E4M3, E4M3_MAX, FP8Linear


def _adanorms(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(block index, 'norm1' | 'norm1_context', its AdaNorm) for every joint block, in order."""
    return [(i, name, getattr(block, name)) for i, block in enumerate(model.transformer_blocks)
            for name in ("norm1", "norm1_context")]


class AdaLNBank(nn.Module):
    """One projection for many AdaNorms: forward(temb [B, D]) -> per block (norm1 chunks,
    norm1_context chunks), each chunk [B, D]. FP8 (all FP8Linear with one input scale) or bf16
    (all nn.Linear of one dtype)."""

    def __init__(self, norms: list[tuple[int, str, nn.Module]], blocks: int) -> None:
        super().__init__()
        lins = [n.linear for _, _, n in norms]
        self.layout = [(i, name, n.n, n.linear.out_features) for i, name, n in norms]
        self.blocks = blocks
        self.fp8 = isinstance(lins[0], FP8Linear)
        if self.fp8:
            self._init_fp8(lins)
        else:
            if not all(type(m) is nn.Linear and m.weight.dtype == lins[0].weight.dtype for m in lins):
                raise ValueError("batch_adaln: the adaLN projections are neither all FP8Linear nor all nn.Linear")
            weight = torch.cat([m.weight.detach() for m in lins])  # [N_total, K]
            self.register_buffer("weight", weight, persistent=False)
            self.register_buffer("bias", torch.cat([m.bias.detach() for m in lins]), persistent=False)
            offset = 0
            for m in lins:  # the layers' weights become views of the bank's: no second copy
                n = m.out_features
                m.weight = nn.Parameter(weight[offset:offset + n], requires_grad=False)
                offset += n

    def _init_fp8(self, lins: list[nn.Module]) -> None:
        if not all(isinstance(m, FP8Linear) for m in lins):
            raise ValueError("batch_adaln: some adaLN projections are FP8Linear and some are not")
        xs = torch.stack([m.scale_x for m in lins])
        if not bool((xs == xs[0]).all()):
            raise ValueError(f"batch_adaln: the adaLN projections' input scales differ ({float(xs.min())} .. "
                             f"{float(xs.max())}); they see one tensor, so a calibration gives them one amax")
        weight = torch.cat([m.weight_t.t() for m in lins])  # [N_total, K] row-major e4m3
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scale_x", lins[0].scale_x.clone(), persistent=False)
        self.register_buffer("inv_scale_x", lins[0].inv_scale_x.clone(), persistent=False)
        self.register_buffer("one", torch.ones((), dtype=torch.float32, device=weight.device), persistent=False)
        self.register_buffer("scale_w", torch.cat([m.scale_w.expand(m.out_features) for m in lins]),
                             persistent=False)  # [N_total] fp32, the per-layer weight scale per column
        zero = lambda m: torch.zeros(m.out_features, dtype=torch.bfloat16, device=weight.device)  # noqa: E731
        self.register_buffer("bias", torch.cat([m.bias if m.bias is not None else zero(m) for m in lins]).float(),
                             persistent=False)  # [N_total] fp32 (bf16 values)
        self.fast_accum = lins[0].fast_accum
        offset = 0
        for m in lins:
            n = m.out_features
            m.weight_t = weight[offset:offset + n].t()  # [K, N] column-major view, as before
            offset += n

    def _project(self, temb: torch.Tensor) -> torch.Tensor:
        x = F.silu(temb)  # [B, K]
        if not self.fp8:
            return F.linear(x, self.weight, self.bias)  # [B, N_total]
        m = x.shape[0]
        x2 = F.pad(x, (0, 0, 0, (-m) % 16))  # [M16, K]: _scaled_mm wants M a multiple of 16
        xq = (x2.float() * self.inv_scale_x).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        fast = getattr(self, "fast_accum", False)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=self.scale_x, scale_b=self.one,
                             out_dtype=torch.float32, use_fast_accum=fast)  # [M16, N_total] = acc * s_x
        return (y[:m] * self.scale_w + self.bias).to(torch.bfloat16)  # FP8Linear's epilogue, per column

    def forward(self, temb: torch.Tensor) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
        y = self._project(temb)
        parts = torch.split(y, [n for *_, n in self.layout], dim=1)
        per_block: list[dict[str, tuple[torch.Tensor, ...]]] = [{} for _ in range(self.blocks)]
        for (i, name, chunks, _), part in zip(self.layout, parts):
            per_block[i][name] = part.chunk(chunks, dim=1)
        return [(d["norm1"], d["norm1_context"]) for d in per_block]


def batch_adaln(model: nn.Module) -> AdaLNBank:
    """Give `model` (an MMDiT, bf16 or after `to_fp8`) one bank for its blocks' adaLN projections,
    in place; its forward then runs one GEMM for them. Returns the bank."""
    bank = AdaLNBank(_adanorms(model), len(model.transformer_blocks))
    model.adaln_bank = bank
    return bank


def unbatch_adaln(model: nn.Module) -> None:
    """Back to one GEMM per block (the layers keep their weights, now views of the bank's)."""
    if getattr(model, "adaln_bank", None) is not None:
        del model.adaln_bank
