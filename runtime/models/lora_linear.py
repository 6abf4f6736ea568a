"""The unfused LoRA side path: `y = base(x) + Σ_slot s[row, slot] · (x Aᵀ) Bᵀ`, base untouched.

`base` is an `nn.Linear` or an `FP8Linear` (its E4M3 weights and calibrated scales stay as they
are). Every wrapped layer of a model shares one `LoraBank`: a fixed number of slots, a fixed max
rank R, and a strengths buffer [rows, slots] that the caller fills in place before each forward
(`LoraBank.set_rows`). Fixed shapes and a buffer updated in place mean that switching LoRAs or
strengths changes no shape and no address: torch.compile does not recompile and a CUDA graph
replays as captured. A slot's per-layer scale (alpha / rank) is folded into its B.

A wrapped layer keeps A as [G, S·R, in] and B as [G, out/G, S·R]: G = 3 for a fused q/k/v (or
add_q/k/v) projection, whose three LoRAs are independent, else 1. Unused slots and ranks are zero.
`fuse_deltas` adds `ΔW` into the base weights instead (E4M3 re-quantized once with a recomputed scale,
from the checkpoint's high-precision weight where the backend can read it).
Over an FP8Linear the bank's `variant` picks how the side path is computed (models/lora_fp8.py:
`delta` is the plain form below; `addmm`, `fp8down`, `catk` cut memory passes); `DEFAULT_VARIANT`
is what the runtime uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import lora_fp8
from .fp8 import E4M3_MAX, FP8Linear, replace_module, to_e4m3

# The FP8 side path the runtime uses. H200, 4 of 38 Large blocks, each alternating with no LoRA
# (BENCHMARKS.md, issue 15, tools/l15d_gpu.sh): catk +4.9 % (rank 16), +6.9 % (rank 64), +6.8 % (the
# default bank, 2 slots × 64); delta +13.9 %. Full-depth cosine vs bf16-with-LoRA: catk 0.99149, delta 0.99272.
DEFAULT_VARIANT = "catk"


class LoraBank(nn.Module):
    """What the wrapped layers of one model share: `slots` × `rank`, per-row strengths [rows, slots]."""

    def __init__(self, slots: int, rank: int, device: torch.device, dtype: torch.dtype, rows: int = 8,
                 variant: str = DEFAULT_VARIANT) -> None:
        super().__init__()
        if variant not in lora_fp8.VARIANTS:
            from ..errors import InvalidInputError

            raise InvalidInputError(f"LoRA side-path variant {variant!r}; use one of {lora_fp8.VARIANTS}")
        self.slots, self.rank, self.dtype, self.variant = slots, rank, dtype, variant
        self.register_buffer("strengths", torch.zeros(rows, slots, device=device, dtype=dtype), persistent=False)

    def set_rows(self, rows: torch.Tensor) -> None:
        """Copy per-row strengths [n, slots] in place (rows past n are zeroed). Grows the buffer
        (a new address: one recompile / re-capture) only when n exceeds every batch seen so far."""
        n = rows.shape[0]
        if n > self.strengths.shape[0]:
            size = 1 << (n - 1).bit_length()
            self.strengths = torch.zeros(size, self.slots, device=self.strengths.device, dtype=self.dtype)
        self.strengths[:n].copy_(rows)
        self.strengths[n:].zero_()


class LoraLinear(nn.Module):
    """`base(x)` plus the bank's slots: [..., in] -> [..., out]; row i of x uses strengths[i]."""

    def __init__(self, base: nn.Module, bank: LoraBank, groups: int = 1, name: str = "") -> None:
        super().__init__()
        self.base, self.groups = base, groups
        self.join = lora_fp8.join_mode(name)  # catk: how its joined input is made (models/lora_fp8.py)
        self.in_features, self.out_features = base.in_features, base.out_features
        self._bank = [bank]  # a list: shared, not a child (no duplicate entries in the module tree)
        width = bank.slots * bank.rank
        dev = bank.strengths.device
        self.register_buffer("lora_a", torch.zeros(groups, width, self.in_features, device=dev, dtype=bank.dtype),
                             persistent=False)  # [G, S*R, in]
        self.register_buffer("lora_b", torch.zeros(groups, self.out_features // groups, width, device=dev,
                                                   dtype=bank.dtype), persistent=False)  # [G, out/G, S*R]
        self.variant = bank.variant if isinstance(base, FP8Linear) else "delta"
        if self.variant != "delta":
            lora_fp8.setup(self)

    @property
    def bank(self) -> LoraBank:
        return self._bank[0]

    def set_slot(self, slot: int, group: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Slot `slot` of group `group` := (A [r, in], B·scale [out/G, r]), zero-padded to the max
        rank; None clears it."""
        r0, r1 = slot * self.bank.rank, (slot + 1) * self.bank.rank
        self.lora_a[group, r0:r1].zero_()
        self.lora_b[group, :, r0:r1].zero_()
        if a is not None:
            r = a.shape[0]
            self.lora_a[group, r0:r0 + r].copy_(a)
            self.lora_b[group, :, r0:r0 + r].copy_(b)
        if self.variant != "delta":
            lora_fp8.derive(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant != "delta":
            return lora_fp8.forward(self, x)
        y = self.base(x)
        bank = self.bank
        s = bank.strengths[: x.shape[0]]  # [B, S]: row b of x (and of its tokens) uses s[b]
        s = s.view(s.shape[0], *([1] * (x.dim() - 2)), 1, bank.slots, 1)  # [B, (1,)* 1, S, 1]
        h = F.linear(x.to(bank.dtype), self.lora_a.flatten(0, 1))  # [..., G*S*R]
        h = (h.unflatten(-1, (self.groups, bank.slots, bank.rank)) * s).flatten(-2)  # [..., G, S*R]
        if self.groups == 1:
            delta = F.linear(h[..., 0, :], self.lora_b[0])  # [..., out]
        else:
            delta = torch.einsum("...gr,gor->...go", h, self.lora_b).flatten(-2)  # [..., out]
        return y + delta.to(y.dtype)


def fuse_delta(layer: nn.Module, group: int, groups: int, delta: torch.Tensor, source=None) -> None:
    """W[rows of `group`] += ΔW [out/G, in], in place (`fuse_deltas` with one delta)."""
    fuse_deltas(layer, [(group, groups, delta)], source)


def fuse_deltas(layer: nn.Module, deltas: list[tuple[int, int, torch.Tensor]], source=None) -> None:
    """W[rows of group] += ΔW for every (group, groups, ΔW [out/G, in]) of `deltas`, in place. An
    FP8Linear is re-quantized to E4M3 once, with a weight scale recomputed from the new max |W| (the
    activation scale stays the calibrated one): from `source()`, its high-precision weight [out, in]
    as the checkpoint holds it, when that gives one and no earlier fuse changed the layer (one
    rounding of W + ΔW), else from its dequantized E4M3 weight (a second rounding). A LoraLinear
    passes them to its base."""
    if isinstance(layer, LoraLinear):
        fuse_deltas(layer.base, deltas, source)
        if layer.variant != "delta":
            lora_fp8.derive(layer)  # catk's B_q depends on the base's weight scale
        return
    if isinstance(layer, FP8Linear):
        src = source() if source is not None and not getattr(layer, "lora_fused", False) else None
        src = src if src is not None and tuple(src.shape) == (layer.out_features, layer.in_features) else None
        dev = layer.weight_t.device
        w = layer.weight_t.t().float() * layer.scale_w if src is None else src.to(dev, torch.float32, copy=True)
        for group, groups, delta in deltas:  # w: [out, in]
            w[_rows(layer, group, groups)] += delta.to(w.device, torch.float32)
        scale = max(float(w.abs().max()), 1e-12) / E4M3_MAX
        layer.weight_t.copy_(to_e4m3(w, scale).t())  # in place: [in, out] column-major, same address
        layer.scale_w.fill_(scale)
        layer.lora_fused = True  # a later fuse starts from these weights (the source lacks this LoRA)
    elif isinstance(layer, nn.Linear):
        with torch.no_grad():
            for group, groups, delta in deltas:
                layer.weight[_rows(layer, group, groups)] += delta.to(layer.weight.device, layer.weight.dtype)
    else:
        raise TypeError(f"cannot fuse a LoRA into {type(layer).__name__}")


def _rows(layer: nn.Module, group: int, groups: int) -> slice:
    return slice(group * layer.out_features // groups, (group + 1) * layer.out_features // groups)


def install(model: nn.Module, name: str, bank: LoraBank, groups: int) -> LoraLinear:
    """The LoraLinear at `name` in `model`, wrapping the Linear/FP8Linear there on first use."""
    layer = model.get_submodule(name)
    if isinstance(layer, LoraLinear):
        return layer
    wrapped = LoraLinear(layer, bank, groups, name)
    replace_module(model, name, wrapped)
    return wrapped


def uninstall(model: nn.Module) -> int:
    """Put every LoraLinear's base back in its place (the side paths dropped); returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = model.get_submodule(name)
        if layer.variant != "delta":
            lora_fp8.release(layer)
        base = layer.base
        if isinstance(owner, nn.ModuleList):
            owner[int(leaf)] = base
        else:
            setattr(owner, leaf, base)
    return len(names)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, FP8Linear, LoraLinear))
