"""Faster LoRA side paths on an `FP8Linear` base (the bank's `variant`; `LoraLinear` dispatches here).

The plain side path (`delta`) reads x again in bf16, writes the delta [M, N] and adds it to the
GEMM output: memory passes, not FLOPs, are its cost. The variants cut passes:

* `addmm`: the up-projection accumulates into the base output (`addmm(y, h·s, Bᵀ)`, B
  block-diagonal over the q/k/v groups): no separate delta tensor.
* `fp8down`: as `addmm`, but the down-projection is an FP8 GEMM on the already-quantized x (A in
  E4M3 with a scale per rank row, folded into the strengths' multiply): x is not read again in
  bf16, and a GELU before `ff.net.2` need not be written in bf16.
* `catk` (the default): the up-projection joins the base GEMM along K: `[x_q | h_q | 0] @ [W_q | B_q | 0]ᵀ`,
  one `_scaled_mm` with K_cat = K + G·S·R rounded up to 128 (`K_ALIGN`), so the output is written
  once and no [M, N] pass is added at all. h = x_q A_qᵀ is an FP8 GEMM too; h·s is quantized to
  E4M3 at the base's activation scale. h_q and B_q share the GEMM's two scales, so a per-rank-column
  factor c balances their ranges; a LoRA with max|h|·max|B| near max|x|·max|W| saturates one of
  them (large random LoRAs can: measure). W's E4M3 bytes move into the joined weight (the base keeps
  a view: no second copy). How the joined input is made without extra passes: `join_mode`.
* `splitk`: as `fp8down`, with the down-projection's K folded into M (x_q [M, K] viewed as
  [M·s, K/s] times all s K-chunks of A side by side; the s diagonal blocks summed are h). H200: it
  costs more than `fp8down` (+27–36 %): the skinny down-projection was never the cost (6–24 µs a
  Large layer, tools/lora_gemm_probe.py); the [M, N] passes, a misaligned K and copies were.

All state is buffers updated in place (`derive`), so switching LoRAs or strengths never recompiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import E4M3, E4M3_MAX

VARIANTS = ("delta", "addmm", "fp8down", "catk", "splitk")
# catk's joined K is a multiple of this: cuBLAS FP8 GEMMs on sm90 run K in 128-wide tiles, and a K
# that is not a multiple of 128 costs a Large FF GEMM ~20 % (H200: K 2432 -> 2448 took 284 -> 342 µs,
# tools/lora_gemm_probe.py); zero columns fill the rest.
K_ALIGN = 128


def block_diag_b(lora_b: torch.Tensor) -> torch.Tensor:
    """[G, N/G, S·R] -> [N, G·S·R]: group g's rows only see group g's rank columns."""
    g, n, w = lora_b.shape
    full = lora_b.new_zeros(g * n, g * w)  # [N, G*S*R]
    for i in range(g):
        full[i * n:(i + 1) * n, i * w:(i + 1) * w] = lora_b[i]
    return full


def setup(layer) -> None:
    """Allocate the variant's buffers on `layer` (a LoraLinear over an FP8Linear)."""
    base, width = layer.base, layer.lora_a.shape[0] * layer.lora_a.shape[1]  # G*S*R
    dev, k, n = base.weight_t.device, layer.in_features, layer.out_features
    layer.register_buffer("h_scale", torch.ones(width, device=dev, dtype=torch.float32), persistent=False)
    if layer.variant in ("fp8down", "catk", "splitk"):
        layer.register_buffer("a_q", torch.zeros(width, k, device=dev, dtype=E4M3), persistent=False)  # [GSR, K]
        layer.register_buffer("one", torch.ones((), device=dev, dtype=torch.float32), persistent=False)
    if layer.variant == "splitk":
        layer.split = split_factor(k, width)
        layer.register_buffer("a_split", torch.zeros(layer.split * width, k // layer.split, device=dev, dtype=E4M3),
                              persistent=False)  # [s*GSR, K/s]: chunk j of A's rows, chunks side by side
    if layer.variant in ("addmm", "fp8down", "splitk"):
        layer.register_buffer("b_t", torch.zeros(width, n, device=dev, dtype=torch.bfloat16), persistent=False)
    if layer.variant == "catk":
        layer.k_cat = -(-(k + width) // K_ALIGN) * K_ALIGN  # K + GSR rounded up: the GEMM's K stays aligned
        w = torch.zeros(n, layer.k_cat, device=dev, dtype=E4M3)  # [N, K_cat] row-major = [K_cat, N] col-major
        w[:, :k] = base.weight_t.t()
        layer.register_buffer("w_cat", w, persistent=False)
        base.weight_t = w[:, :k].t()  # the base's bytes now live in w_cat: [K, N] view (no copy kept)


def split_factor(k: int, width: int, max_cols: int = 256) -> int:
    """The largest s in 8, 4, 2 with s·width ≤ max_cols and K/s a multiple of 16 (else 1)."""
    for s in (8, 4, 2):
        if s * width <= max_cols and k % (16 * s) == 0:
            return s
    return 1


def release(layer) -> None:
    """Before the base goes back without its wrapper: give it a contiguous weight of its own."""
    if layer.variant == "catk":
        layer.base.weight_t = layer.w_cat[:, :layer.in_features].contiguous().t()


def _rowwise_scale(m: torch.Tensor, target: float) -> torch.Tensor:
    """Per-row factor mapping each row's max |value| to `target` (empty rows: 1)."""
    amax = m.abs().amax(dim=1).float()
    return torch.where(amax > 0, target / amax.clamp_min(1e-30), torch.ones_like(amax))


@torch.no_grad()
def derive(layer) -> None:
    """Recompute the variant's buffers from the master A [G, S·R, in] and B [G, out/G, S·R]."""
    base, k = layer.base, layer.in_features
    a = layer.lora_a.flatten(0, 1).float()  # [GSR, K]
    b_full = block_diag_b(layer.lora_b).float()  # [N, GSR]
    if layer.variant == "addmm":
        layer.b_t.copy_(b_full.t())
        return
    inv_sa = _rowwise_scale(a, E4M3_MAX)  # [GSR]: A row r -> E4M3 at scale 1 / inv_sa[r]
    layer.a_q.copy_((a * inv_sa[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3))
    if layer.variant == "splitk":
        gsr, sp = a.shape[0], layer.split
        layer.a_split.copy_(layer.a_q.view(gsr, sp, k // sp).transpose(0, 1).reshape(sp * gsr, k // sp))
    if layer.variant in ("fp8down", "splitk"):
        layer.b_t.copy_(b_full.t())
        layer.h_scale.copy_(1.0 / inv_sa)
        return
    sw = base.scale_w.float()
    # h_q and B_q share the GEMM's scales, so only their product's range is fixed: c[r] splits it.
    # c_b: B col r at 448; c_h: h col r at 448 if |h_r| reached amax_x·|A_r| (a bound). Geometric mean.
    c_b = _rowwise_scale(b_full.t(), E4M3_MAX) * sw  # [GSR]
    c_h = a.norm(dim=1).clamp_min(1e-30)  # [GSR]
    c = (c_b * c_h).sqrt()
    layer.w_cat[:, k:k + b_full.shape[1]] = (b_full * (c / sw)[None, :]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    layer.h_scale.copy_(1.0 / (inv_sa * c * base.scale_x.float()))


# catk's joined input [x_q | h_q | 0] [M, K_cat] is made one of two ways, by what produces x:
# * "pad" (x from a pointwise op: attention output, GELU): the producer writes x_q padded to K_cat
#   straight into the joined buffer, the down-projection reads its first K columns in place
#   (`lora_down`, an op of its own: inductor's GEMM lowering would copy the strided view, or
#   recompute the producer), and `write_columns` puts h_q in.
# * "copy" (x from a LayerNorm + modulate: q/k/v, FF in): padding there would split the norm's one
#   reduction kernel into two passes over x (H200: about +60 µs per Large norm), so x_q stays [M, K]
#   and `join_columns` copies it and h_q into the joined buffer (one fp8 pass over x).
# Which layers are which: their names (PAD_JOIN_SUFFIXES).
PAD_JOIN_SUFFIXES = ("to_out.0", "to_add_out", "net.2")


def join_mode(name: str) -> str:
    return "pad" if name.endswith(PAD_JOIN_SUFFIXES) else "copy"


@torch.library.custom_op("sd35trt::lora_down", mutates_args=())
def lora_down(x: torch.Tensor, k: int, a_q: torch.Tensor, scale_x: torch.Tensor, one: torch.Tensor,
              fast_accum: bool) -> torch.Tensor:
    """x[:, :k] @ a_qᵀ in FP8 (x: [M, K_cat] row-major, read in place) -> [M, GSR] bf16."""
    return torch._scaled_mm(x[:, :k], a_q.t(), scale_a=scale_x, scale_b=one, out_dtype=torch.bfloat16,
                            use_fast_accum=fast_accum)


@lora_down.register_fake
def _(x, k, a_q, scale_x, one, fast_accum):
    return x.new_empty((x.shape[0], a_q.shape[0]), dtype=torch.bfloat16)


@torch.library.custom_op("sd35trt::join_columns", mutates_args=())
def join_columns(x: torch.Tensor, h: torch.Tensor, width: int) -> torch.Tensor:
    """[x | h | 0] of width `width` (x [M, K], h [M, W], one dtype): one copy of each, zeros after."""
    m, k = x.shape
    zeros = torch.zeros(m, width - k - h.shape[1], device=x.device, dtype=torch.uint8)  # [M, K_cat - K - W]
    # As bytes: one vectorized cat kernel (an fp8 slice copy_ is an unvectorized strided kernel, H200:
    # ~4x slower) and a fill that fp8 lacks on some devices.
    return torch.cat([x.view(torch.uint8), h.view(torch.uint8), zeros], dim=1).view(x.dtype)  # [M, K_cat]


@join_columns.register_fake
def _(x, h, width):
    return x.new_empty((x.shape[0], width))


@torch.library.custom_op("sd35trt::write_columns", mutates_args=("dst",))
def write_columns(dst: torch.Tensor, src: torch.Tensor, start: int) -> None:
    """dst[:, start:start + src.shape[1]] = src, in place. An op of its own so that inductor moves
    only src's bytes: the same write as a slice assignment becomes a pass over all of dst."""
    dst[:, start:start + src.shape[1]].copy_(src)


@write_columns.register_fake
def _(dst: torch.Tensor, src: torch.Tensor, start: int) -> None:
    return None


def _row_strengths(layer, x: torch.Tensor, m_pad: int) -> torch.Tensor:
    """[M_pad, S]: row i of x2 (flattened [..., in]) uses strengths[batch index of i]; pad rows 0."""
    bank = layer.bank
    b = x.shape[0]
    s = bank.strengths[:b].float()  # [B, S]
    m = x.numel() // x.shape[-1]
    rows = s[:, None, :].expand(b, m // b, bank.slots).reshape(m, bank.slots)  # [M, S]
    return F.pad(rows, (0, 0, 0, m_pad - m))


def _split_down(layer, xq: torch.Tensor) -> torch.Tensor:
    """h = x_q A_qᵀ (A's row scales still to apply) as one GEMM with K/s: [M_pad, K] -> [M_pad, GSR]."""
    m, k = xq.shape
    sp, gsr = layer.split, layer.h_scale.shape[0]
    p = torch._scaled_mm(xq.view(m * sp, k // sp), layer.a_split.t(), scale_a=layer.base.scale_x,
                         scale_b=layer.one, out_dtype=torch.bfloat16,
                         use_fast_accum=layer.base.fast_accum)  # [M*s, s*GSR]: chunk i of x times chunk j of A
    return p.view(m, sp, sp, gsr).diagonal(dim1=1, dim2=2).float().sum(-1)  # [M, GSR, s] -> [M, GSR]


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    """[..., in] -> [..., out] through the bank's variant (not `delta`)."""
    base, bank = layer.base, layer.bank
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    m = x2.shape[0]
    x2 = F.pad(x2, (0, 0, 0, (-m) % 16))  # [M_pad, K]: _scaled_mm wants M % 16 == 0
    xs = x2.float() * base.inv_scale_x  # [M_pad, K]
    pad = layer.variant == "catk" and layer.join == "pad"
    if pad:  # x_q is written once, into the joined buffer (see PAD_JOIN_SUFFIXES)
        xs = F.pad(xs, (0, layer.k_cat - k))  # [M_pad, K_cat]: columns K.. get h_q below, the rest stay 0
    xq = xs.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # [M_pad, K] or [M_pad, K_cat]
    g = layer.groups
    if layer.variant == "addmm":
        h = F.linear(x2.to(layer.lora_a.dtype), layer.lora_a.flatten(0, 1)).float()  # [M_pad, GSR]
    elif layer.variant == "splitk":
        h = _split_down(layer, xq)  # [M_pad, GSR]
    else:
        h = lora_down(xq, k, layer.a_q, base.scale_x, layer.one, base.fast_accum).float()  # [M_pad, GSR]
    s = _row_strengths(layer, x, x2.shape[0])  # [M_pad, S]
    hs = (h.view(-1, g, bank.slots, bank.rank) * s[:, None, :, None]).flatten(1) * layer.h_scale  # [M_pad, GSR]
    if layer.variant == "catk":
        hq = hs.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # [M_pad, GSR]
        if pad:
            write_columns(xq, hq, k)  # in place: only [M_pad, GSR] bytes move
        else:
            xq = join_columns(xq, hq, layer.k_cat)  # [M_pad, K_cat]
        y = torch._scaled_mm(xq, layer.w_cat.t(), scale_a=base.scale_x, scale_b=base.scale_w, bias=base.bias,
                             out_dtype=torch.bfloat16, use_fast_accum=base.fast_accum)  # [M_pad, N]
    else:
        y = torch._scaled_mm(xq, base.weight_t, scale_a=base.scale_x, scale_b=base.scale_w, bias=base.bias,
                             out_dtype=torch.bfloat16, use_fast_accum=base.fast_accum)  # [M_pad, N]
        y = torch.addmm(y, hs.to(torch.bfloat16), layer.b_t)  # [M_pad, N]
    return y[:m].reshape(*lead, layer.out_features)
