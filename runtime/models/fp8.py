"""Real FP8 (E4M3) matrix products for the MMDiT in plain torch (`torch._scaled_mm`).

The calibrated state is a dict of per-tensor amax values named like ModelOpt's quantizers
("<linear>.input_quantizer", "<linear>.weight_quantizer"). Each calibrated Linear becomes an
`FP8Linear`: weights stored in FP8 (no bf16 copy kept), a static activation scale, one
`_scaled_mm` with the bias fused, bf16 out. q/k/v projections are fused first (one GEMM), their
scales merged (the inputs are the same tensor; the weight scale is the largest of the three).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

# Layers that stay in high precision by default (ModelOpt exclusion list and torch-fp8 alike).
HIGH_PRECISION = ("pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out")
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "add_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
FUSED_QKV = _FUSED  # fused projection -> its parts, in the order `fuse_qkv` concatenates them


def to_e4m3(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """x / scale rounded to E4M3, saturating at +-448 (per-tensor scale). On the meta device (the
    engine-set skeletons) just an E4M3 tensor of x's shape: the meta clamp alone took 3 of the 3.9 s
    of a Large MMDiT skeleton on the CPU."""
    if x.is_meta:
        return torch.empty(x.shape, dtype=E4M3, device="meta")
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


class FP8Linear(nn.Module):
    """y = (x/s_x -> e4m3) @ (W/s_w -> e4m3)^T * s_x * s_w + b, accumulated in fp32, bf16 out."""

    def __init__(self, linear: nn.Linear, in_amax: float, w_amax: float, fast_accum: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w_scale = max(w_amax, 1e-12) / E4M3_MAX
        x_scale = max(in_amax, 1e-12) / E4M3_MAX
        w = to_e4m3(linear.weight.detach(), w_scale)
        self.register_buffer("weight_t", w.t())  # [K, N] column-major, as _scaled_mm wants
        self.register_buffer("scale_w", torch.tensor(w_scale, dtype=torch.float32, device=w.device))
        self.register_buffer("scale_x", torch.tensor(x_scale, dtype=torch.float32, device=w.device))
        self.register_buffer("inv_scale_x", torch.tensor(1.0 / x_scale, dtype=torch.float32, device=w.device))
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.fast_accum = fast_accum
        self.gemm = cublas_gemm  # (layer, x_q [M, K] e4m3) -> [M, N] bf16; models/fp8_gemm.py may swap in quack's

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x/s_x in E4M3 [M, K], M = prod(lead) padded up to a multiple of 16."""
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        pad = (-x2.shape[0]) % 16  # _scaled_mm wants M a multiple of 16 (adaLN inputs have M = batch)
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        xq = x2.to(torch.float32, copy=True)  # [M, K]: one fp32 temporary, scaled and clamped in place (eager
        return xq.mul_(self.inv_scale_x).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)  # peaks: 1 not 3 copies), e4m3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.gemm(self, self.quantize(x))  # [M_pad, N]
        return y[:lead.numel()].reshape(*lead, self.out_features)


def cublas_gemm(layer: FP8Linear, xq: torch.Tensor) -> torch.Tensor:
    """x_q [M, K] e4m3 -> x_q w_q^T s_x s_w + b [M, N] bf16: one cuBLAS `_scaled_mm`, bias fused."""
    return torch._scaled_mm(xq, layer.weight_t, scale_a=layer.scale_x, scale_b=layer.scale_w, bias=layer.bias,
                            out_dtype=torch.bfloat16, use_fast_accum=layer.fast_accum)


def fused_amax(amax: Mapping[str, float]) -> dict[str, float]:
    """Add entries for fused q/k/v projections: max over the three (inputs are the same tensor)."""
    out = dict(amax)
    for key in list(amax):
        module, _, kind = key.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        for fused, parts in _FUSED.items():
            if leaf == parts[0]:
                vals = [amax.get(f"{parent}.{p}.{kind}") for p in parts]
                if all(v is not None for v in vals):
                    out[f"{parent}.{fused}.{kind}"] = max(vals)
    return out


def to_fp8(model: nn.Module, amax: Mapping[str, float], fuse_qkv: bool = True, fast_accum: bool = False) -> nn.Module:
    """Replace every calibrated Linear of `model` by an FP8Linear, in place; the rest is untouched."""
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted({k.rpartition(".")[0] for k in amax} - linears)
    if unknown or not amax:
        from ..errors import CheckpointError

        raise CheckpointError(f"the FP8 calibration does not match this model (no Linear named {unknown[:3]}); "
                              f"calibrate this checkpoint: sd35trt export --model … --precision fp8")
    amax = fused_amax(amax)
    if fuse_qkv:
        for mod in model.modules():
            if hasattr(mod, "fuse_qkv"):
                mod.fuse_qkv()
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and f"{n}.input_quantizer" in amax]
    for name, lin in targets:
        replace_module(model, name, FP8Linear(lin, amax[f"{name}.input_quantizer"], amax[f"{name}.weight_quantizer"], fast_accum))
    return model


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.ModuleList):
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


@torch.no_grad()
def max_calibrate(model: nn.Module, forward, exclude: tuple[str, ...]) -> dict[str, float]:
    """Per-tensor max |x| of every Linear input and weight not under `exclude` (the same statistic
    as ModelOpt's max calibration; for random-weight benchmarks where ModelOpt is not installed)."""
    amax: dict[str, float] = {}
    running: dict[str, torch.Tensor] = {}  # on the device: no host sync per call (a whole denoising run is hooked)
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not name.startswith(exclude):
            amax[f"{name}.weight_quantizer"] = float(mod.weight.abs().max())

            def hook(m, inp, _out, key=f"{name}.input_quantizer"):
                now = inp[0].detach().abs().amax().float()
                running[key] = torch.maximum(running[key], now) if key in running else now

            hooks.append(mod.register_forward_hook(hook))
    try:
        forward(model)
    finally:
        for h in hooks:
            h.remove()
    return {**amax, **{k: float(v) for k, v in running.items()}}


def load_amax(path) -> dict[str, float]:
    """amax per quantizer from `amax.safetensors` (written by `sd35trt export`), or its folder."""
    from pathlib import Path

    from safetensors.torch import load_file

    from ..errors import CheckpointError

    path = Path(path)
    file = path / "amax.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no FP8 calibration at {file}; run `sd35trt export --precision fp8` and pass "
                              f"calibration=<export dir>/calibration")
    return {k: float(v.float().max()) for k, v in load_file(str(file)).items()}


class FP8WeightLinear(nn.Module):
    """Weight-only FP8 (per-tensor scale), bf16 compute: halves a Linear's memory where activation
    outliers make FP8 activations unsafe (T5-XXL)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = 1.0 if w.is_meta else max(float(w.abs().max()), 1e-12) / E4M3_MAX  # meta: a skeleton to load into
        self.register_buffer("weight_fp8", to_e4m3(w, scale))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32, device=w.device))
        self.register_buffer("bias", linear.bias.detach() if linear.bias is not None else None)
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=w.dtype, device=w.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor of the compute dtype: some HF modules (T5's `wo`) read `.weight.dtype`."""
        return self._dtype_probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_fp8.to(x.dtype)  # [N, K], transient; exact (E4M3 values are bf16 values)
        y = F.linear(x, w) * self.scale.to(x.dtype)  # the per-tensor scale on the output: one small pass
        return y if self.bias is None else y + self.bias


def fp8_weights_only(model: nn.Module) -> nn.Module:
    """Replace every Linear of `model` by an FP8WeightLinear, in place."""
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        replace_module(model, name, FP8WeightLinear(lin))
    return model
