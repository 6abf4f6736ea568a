"""T5-XXL with real FP8 GEMMs: static per-tensor activation scales calibrated over prompts, the
outlier-heavy Linears kept high precision.

T5's feed-forward output projection (`wo`, fed by gelu(wi_0 x) * wi_1 x) carries the activation
outliers T5-XXL is known for (transformers keeps it in fp32 for fp16 runs), so by default it stays
weight-only FP8 with bf16 compute (`FP8WeightLinear`); q/k/v/o and wi_0/wi_1, all fed by RMS-normed
inputs, become `FP8TextLinear` (the MMDiT's `FP8Linear` plus the `.weight` dtype probe that
transformers' T5 code reads).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .fp8 import FP8Linear, FP8WeightLinear, replace_module

# Linear name suffixes kept high precision (weight-only FP8, bf16 compute) in T5.
T5_HIGH_PRECISION = ("DenseReluDense.wo",)


class FP8TextLinear(FP8Linear):
    """An FP8Linear that answers `.weight.dtype` (bf16) as transformers' T5 layers ask."""

    def __init__(self, linear: nn.Linear, in_amax: float, w_amax: float, fast_accum: bool = False) -> None:
        super().__init__(linear, in_amax, w_amax, fast_accum)
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=torch.bfloat16, device=self.weight_t.device),
                             persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self._dtype_probe


@torch.no_grad()
def calibrate_linears(model: nn.Module, batches: Iterable[torch.Tensor],
                      forward: Callable | None = None) -> dict[str, float]:
    """amax of every Linear's input (max over all `batches` of input ids) and weight, named as the
    MMDiT calibration ("<name>.input_quantizer", "<name>.weight_quantizer")."""
    amax: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            amax[f"{name}.weight_quantizer"] = float(mod.weight.abs().max())

            def hook(m, inp, _out, key=f"{name}.input_quantizer"):
                amax[key] = max(amax.get(key, 0.0), float(inp[0].abs().max()))

            hooks.append(mod.register_forward_hook(hook))
    try:
        for ids in batches:
            (forward or model)(ids)
    finally:
        for h in hooks:
            h.remove()
    return amax


def t5_to_fp8(model: nn.Module, amax: Mapping[str, float], keep: tuple[str, ...] = T5_HIGH_PRECISION,
              fast_accum: bool = True) -> nn.Module:
    """In place: every Linear of T5 with a calibrated input -> FP8TextLinear, except names ending in
    `keep` -> FP8WeightLinear (weight-only FP8). Returns the model."""
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        key = f"{name}.input_quantizer"
        if name.endswith(keep) or key not in amax:
            replace_module(model, name, FP8WeightLinear(lin))
        else:
            replace_module(model, name, FP8TextLinear(lin, amax[key], amax[f"{name}.weight_quantizer"], fast_accum))
    return model
