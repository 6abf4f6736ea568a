"""The MMDiT's FP8 GEMM kernel, chosen once at load: quack's CuTe-DSL GEMM on sm90, cuBLAS otherwise.

quack (`quack-kernels`, which `flash-attn-4` already depends on: the `hopper` extra) has a Hopper FP8
GEMM whose epilogue is a plain function over the accumulator (models/quack_epi.py). At the SD3.5
Large image-stream shapes on the H200 it is 1.05–1.39× faster than cuBLAS `_scaled_mm` with fast
accumulation (tools/quack_probe.py, BENCHMARKS.md), and one kernel does FF1 + GELU(tanh) + the FF2
input's E4M3 quantization, so the [M, 4D] bf16 FF1 output is never written.

What `use_quack(model)` changes, in place (and `use_quack(model, False)` undoes; either one first
undoes the opt-in `fuse_qk_norm`, the q/k RMS-norm in the QKV GEMM's epilogue, fusion `quack-qknorm`,
correct on the H200 but 3.3 ms a Large step slower there, 85.0 vs 81.7 ms):
* every FP8Linear's `gemm` becomes `quack_gemm` (`sd35trt::quack_fp8_gemm`: alpha*acc + bias, bf16
  out) for M >= MIN_M rows; below that (adaLN inputs: M = batch) cuBLAS stays;
* every FeedForward whose two Linears are plain FP8Linears runs FF1 through
  `sd35trt::quack_fp8_gemm_gelu_q` (E4M3 out, FF2's input scale) and FF2 on that E4M3 tensor.
  LoRA-wrapped Linears keep the unfused path (they are not FP8Linear).
It also undoes the opt-in `join_qkv` (fusion `quack-joint`, CPU-checked, not yet run on a GPU): each
joint attention's two QKV GEMMs write one [B, N_img + N_ctx, 3D] buffer
(`sd35trt::quack_fp8_joint_qkv`, 2·B quack calls whose outputs are row slices of it), so no cat copies v.
The ops are `torch.library` custom ops (fullgraph compile and CUDA graphs hold); their CPU kernels
compute the same math with `_scaled_mm` (the cuBLAS path) so the glue runs and is tested off the GPU.
Tile config: 128x192, pingpong, cluster 2x1: the fastest of four on every shape. Always fast
accumulation, whatever a layer's `fast_accum` (cuBLAS's flag) says: quack's default path, which
promotes every k-tile to fp32, measured 7-8x slower.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from .flash_attention import import_error
from .fp8 import E4M3, E4M3_MAX, FP8Linear, cublas_gemm
from .mmdit import Attention, FeedForward, RMSNorm, gelu_tanh

MIN_M = 128  # fewer rows than one tile: cuBLAS (the adaLN GEMVs)
QK_EPS = 1e-6  # the eps quack_epi.qkv_norm_epi is compiled with (SD3.5's q/k RMSNorm)
MAJORS = (9,)  # sm90: the kernel class this module configures (GemmSm90)
TILE = dict(tile_M=128, tile_N=192, cluster_M=2, cluster_N=1, pingpong=True)
FAST_ACCUM = (("fp8_slow_accum", False),)  # quack promotes every k-tile to fp32 unless told otherwise
INSTALL_HINT = "pip install 'sd35trt[hopper]' (quack-kernels, with flash-attn-4)"
_lock = threading.Lock()
_ops_ready = False


def _cpu_linear(xq, w, alpha, bias) -> torch.Tensor:
    one = torch.ones((), dtype=torch.float32, device=xq.device)
    return torch._scaled_mm(xq, w.t(), scale_a=alpha.reshape(()), scale_b=one, bias=bias[0].to(torch.bfloat16),
                            out_dtype=torch.bfloat16)  # [M, N]


def register_ops() -> None:
    """`sd35trt::quack_fp8_gemm` and `sd35trt::quack_fp8_gemm_gelu_q` (once, thread-safe)."""
    global _ops_ready
    with _lock:
        if _ops_ready or hasattr(getattr(torch.ops, "sd35trt", None), "quack_fp8_gemm"):
            _ops_ready = True
            return

        @torch.library.custom_op("sd35trt::quack_fp8_gemm", mutates_args=(), device_types="cuda")
        def quack_fp8_gemm(xq: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            """xq [M, K] e4m3, w [N, K] e4m3, alpha [] fp32 (s_x s_w), bias [1, N] fp32 -> [M, N] bf16."""
            from . import quack_epi

            out = torch.empty(xq.shape[0], w.shape[0], dtype=torch.bfloat16, device=xq.device)  # [M, N]
            quack_epi.linear_epi.gemm(xq, w, out, epi_args=dict(alpha=alpha, bias=bias),
                                      post_init_attrs=FAST_ACCUM, **TILE)
            return out

        @torch.library.custom_op("sd35trt::quack_fp8_gemm_gelu_q", mutates_args=(), device_types="cuda")
        def quack_fp8_gemm_gelu_q(xq: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor,
                                  inv_s: torch.Tensor) -> torch.Tensor:
            """The same GEMM, then GELU(tanh), / s_next, E4M3 (saturating) -> [M, N] e4m3."""
            from . import quack_epi

            out = torch.empty(xq.shape[0], w.shape[0], dtype=E4M3, device=xq.device)  # [M, N]
            quack_epi.gelu_quant_epi.gemm(xq, w, out, epi_args=dict(alpha=alpha, bias=bias, inv_s=inv_s),
                                          post_init_attrs=FAST_ACCUM, **TILE)
            return out

        @torch.library.custom_op("sd35trt::quack_fp8_gemm_qknorm", mutates_args=(), device_types="cuda")
        def quack_fp8_gemm_qknorm(xq: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor,
                                  qk_w: torch.Tensor, v_one: torch.Tensor, head_dim: int) -> torch.Tensor:
            """The fused QKV GEMM with the q/k RMS-norm (qk_w, v_one [1, 3D] fp32: see qk_norm_ref)."""
            from . import quack_epi

            out = torch.empty(xq.shape[0], w.shape[0], dtype=torch.bfloat16, device=xq.device)  # [M, 3D]
            quack_epi.qkv_norm_epi.gemm(xq, w, out, epi_args=dict(alpha=alpha, bias=bias, qk_w=qk_w, v_one=v_one,
                                                                  qk=head_dim), post_init_attrs=FAST_ACCUM, **TILE)
            return out

        @quack_fp8_gemm_qknorm.register_fake
        def _(xq, w, alpha, bias, qk_w, v_one, head_dim):
            return xq.new_empty((xq.shape[0], w.shape[0]), dtype=torch.bfloat16)

        @quack_fp8_gemm_qknorm.register_kernel("cpu")
        def _(xq, w, alpha, bias, qk_w, v_one, head_dim):
            return qk_norm_ref(_cpu_linear(xq, w, alpha, bias), qk_w, v_one, head_dim)

        @quack_fp8_gemm.register_fake
        def _(xq, w, alpha, bias):
            return xq.new_empty((xq.shape[0], w.shape[0]), dtype=torch.bfloat16)

        @quack_fp8_gemm_gelu_q.register_fake
        def _(xq, w, alpha, bias, inv_s):
            return xq.new_empty((xq.shape[0], w.shape[0]), dtype=E4M3)

        @quack_fp8_gemm.register_kernel("cpu")
        def _(xq, w, alpha, bias):
            return _cpu_linear(xq, w, alpha, bias)

        @quack_fp8_gemm_gelu_q.register_kernel("cpu")
        def _(xq, w, alpha, bias, inv_s):
            g = gelu_tanh(_cpu_linear(xq, w, alpha, bias).float()) * inv_s
            return g.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)

        @torch.library.custom_op("sd35trt::quack_fp8_joint_qkv", mutates_args=(), device_types="cuda")
        def quack_fp8_joint_qkv(xq: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor,
                                cq: torch.Tensor, cw: torch.Tensor, c_alpha: torch.Tensor, c_bias: torch.Tensor,
                                batch: int, n_img: int, n_ctx: int) -> torch.Tensor:
            """Both fused QKV projections of a joint attention written into one buffer (no cat)."""
            from . import quack_epi

            out = _joint_out(xq, w, batch, n_img, n_ctx)  # [B, n_img + n_ctx, 3D]
            for b, (x, wt, a, bb), n, start in _joint_parts(xq, w, alpha, bias, cq, cw, c_alpha, c_bias,
                                                                  batch, n_img, n_ctx):
                quack_epi.linear_epi.gemm(x, wt, out[b, start:start + n], epi_args=dict(alpha=a, bias=bb),
                                          post_init_attrs=FAST_ACCUM, **TILE)
            return out

        @quack_fp8_joint_qkv.register_fake
        def _(xq, w, alpha, bias, cq, cw, c_alpha, c_bias, batch, n_img, n_ctx):
            return _joint_out(xq, w, batch, n_img, n_ctx)

        @quack_fp8_joint_qkv.register_kernel("cpu")
        def _(xq, w, alpha, bias, cq, cw, c_alpha, c_bias, batch, n_img, n_ctx):
            out = _joint_out(xq, w, batch, n_img, n_ctx)
            for b, (x, wt, a, bb), n, start in _joint_parts(xq, w, alpha, bias, cq, cw, c_alpha, c_bias,
                                                                  batch, n_img, n_ctx):
                out[b, start:start + n] = _cpu_linear(x, wt, a, bb)
            return out

        _ops_ready = True


def _joint_out(xq: torch.Tensor, w: torch.Tensor, batch: int, n_img: int, n_ctx: int) -> torch.Tensor:
    return xq.new_empty((batch, n_img + n_ctx, w.shape[0]), dtype=torch.bfloat16)  # [B, n_img + n_ctx, 3D]


def _joint_parts(xq, w, alpha, bias, cq, cw, c_alpha, c_bias, batch: int, n_img: int, n_ctx: int):
    """(batch index, GEMM operands, rows, first token) of each of the 2·B GEMMs of the joint QKV: image
    rows b·n_img… of xq (padded [M_pad, K]) go to tokens 0…n_img of batch b, context rows after them."""
    for b in range(batch):
        yield b, (xq[b * n_img:(b + 1) * n_img], w, alpha, bias), n_img, 0  # [n_img, K] -> [n_img, 3D]
        yield b, (cq[b * n_ctx:(b + 1) * n_ctx], cw, c_alpha, c_bias), n_ctx, n_img


def quack_gemm(layer: FP8Linear, xq: torch.Tensor) -> torch.Tensor:
    """x_q [M, K] e4m3 -> [M, N] bf16 through quack (cuBLAS below MIN_M rows)."""
    if xq.shape[0] < MIN_M:
        return cublas_gemm(layer, xq)
    return torch.ops.sd35trt.quack_fp8_gemm(xq, layer.weight_t.t(), layer.alpha, layer.bias_row)


def _prepare(layer: FP8Linear) -> None:
    """The epilogue's operands as buffers (not saved: state dicts are unchanged)."""
    if not hasattr(layer, "alpha"):
        layer.register_buffer("alpha", (layer.scale_x * layer.scale_w).reshape(()), persistent=False)
        bias = layer.bias if layer.bias is not None else layer.scale_x.new_zeros(layer.out_features)
        layer.register_buffer("bias_row", bias.float()[None].contiguous(), persistent=False)  # [1, N]


class QuackFeedForward(FeedForward):
    """FF1 + GELU + the FF2 input's quantization in one quack kernel, then FF2 on the E4M3 tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ff1, ff2 = self.net[0].proj, self.net[2]
        lead = x.shape[:-1]
        if type(ff1) is not FP8Linear or type(ff2) is not FP8Linear or lead.numel() < MIN_M:
            return super().forward(x)  # LoRA-wrapped layers, or too few rows for a tile
        xq = ff1.quantize(x)  # [M_pad, D] e4m3
        h = torch.ops.sd35trt.quack_fp8_gemm_gelu_q(xq, ff1.weight_t.t(), ff1.alpha, ff1.bias_row,
                                                   ff2.inv_scale_x)  # [M_pad, 4D] e4m3
        y = ff2.gemm(ff2, h)  # [M_pad, D] bf16
        return y[:lead.numel()].reshape(*lead, ff2.out_features)


class QuackAttention(Attention):
    """Joint attention whose two fused QKV projections write one [B, N_img + N_ctx, 3D] buffer
    (`sd35trt::quack_fp8_joint_qkv`): v is a view of it, so no torch.cat copies v; the q/k norms'
    cat stays (compiled, it fuses into the norms' kernel). Anything else (image-only attention, LoRA-wrapped or
    q/k-norm-fused projections, fewer than MIN_M rows) runs Attention's forward."""

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None):
        lin, clin = getattr(self, "to_qkv", None), getattr(self, "add_qkv", None)
        if ctx is None or not all(type(m) is FP8Linear and m.gemm is quack_gemm for m in (lin, clin)) \
                or min(x.shape[0] * x.shape[1], ctx.shape[0] * ctx.shape[1]) < MIN_M:
            return super().forward(x, ctx)
        batch, n_img, n_ctx = x.shape[0], x.shape[1], ctx.shape[1]
        qkv = torch.ops.sd35trt.quack_fp8_joint_qkv(lin.quantize(x), lin.weight_t.t(), lin.alpha, lin.bias_row,
                                                    clin.quantize(ctx), clin.weight_t.t(), clin.alpha,
                                                    clin.bias_row, batch, n_img, n_ctx)  # [B, N, 3D]
        q, k, v = (self._heads(t) for t in qkv.chunk(3, dim=-1))  # [B, N, heads, head_dim] views
        if hasattr(self, "norm_q"):
            q = torch.cat([self.norm_q(q[:, :n_img]), self.norm_added_q(q[:, n_img:])], 1)
            k = torch.cat([self.norm_k(k[:, :n_img]), self.norm_added_k(k[:, n_img:])], 1)
        return self._project(self.core(q, k, v).flatten(2).to(q.dtype), n_img, ctx)


def join_qkv(model: nn.Module) -> int:
    """Opt-in fusion `quack-joint`: every Attention becomes a QuackAttention, in place (use_quack,
    either way, turns them back). Needs use_quack first. Returns the joint attentions."""
    register_ops()
    attns = [m for m in model.modules() if type(m) is Attention]
    for attn in attns:
        attn.__class__ = QuackAttention
    return sum(hasattr(a, "add_qkv") for a in attns)


def qk_norm_ref(y: torch.Tensor, qk_w: torch.Tensor, v_one: torch.Tensor, head_dim: int,
                eps: float = QK_EPS) -> torch.Tensor:
    """y [M, 3D] (q | k | v) -> q and k RMS-normed per head times their weights, v as it is (bf16)."""
    g = y.float().unflatten(-1, (-1, head_dim))  # [M, 3H, hd]
    rstd = torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)  # [M, 3H, 1]
    scale = rstd * qk_w.view(1, -1, head_dim) + v_one.view(1, -1, head_dim)  # [M, 3H, hd]
    return (g * scale).flatten(-2).to(torch.bfloat16)


def quack_qknorm_gemm(layer: FP8Linear, xq: torch.Tensor) -> torch.Tensor:
    """x_q [M, K] -> the fused QKV projection with q/k RMS-normed [M, 3D] bf16 (the math of
    qk_norm_ref after cuBLAS below MIN_M rows)."""
    if xq.shape[0] < MIN_M:
        return qk_norm_ref(cublas_gemm(layer, xq), layer.qk_w, layer.v_one, layer.head_dim)
    return torch.ops.sd35trt.quack_fp8_gemm_qknorm(xq, layer.weight_t.t(), layer.alpha, layer.bias_row,
                                                   layer.qk_w, layer.v_one, layer.head_dim)


QK_PAIRS = (("to_qkv", "norm_q", "norm_k"), ("add_qkv", "norm_added_q", "norm_added_k"))


def fuse_qk_norm(model: nn.Module) -> int:
    """Move every fused q/k/v projection's q/k RMS-norm into its quack GEMM (opt-in fusion
    `quack-qknorm`), in place: the attention's norms become Identity (kept aside, restored by
    unfuse_qk_norm). Needs use_quack first. Returns the projections fused."""
    register_ops()
    count = 0
    for attn in [m for m in model.modules() if isinstance(m, Attention)]:
        for fused, nq_name, nk_name in QK_PAIRS:
            lin, nq, nk = (getattr(attn, n, None) for n in (fused, nq_name, nk_name))
            if type(lin) is not FP8Linear or not isinstance(nq, RMSNorm) or lin.gemm is not quack_gemm:
                continue
            if nq.eps != QK_EPS or nk.eps != QK_EPS:
                continue  # the kernel's eps is fixed: such a norm stays where it is
            heads, hd = attn.heads, attn.head_dim
            zeros = torch.zeros(heads * hd, dtype=torch.float32, device=lin.weight_t.device)
            qk_w = torch.cat([nq.weight.float().repeat(heads), nk.weight.float().repeat(heads), zeros])[None]
            v_one = torch.cat([zeros, zeros, torch.ones_like(zeros)])[None]  # [1, 3D]
            lin.register_buffer("qk_w", qk_w.contiguous(), persistent=False)
            lin.register_buffer("v_one", v_one.contiguous(), persistent=False)
            lin.head_dim, lin.gemm = hd, quack_qknorm_gemm
            attn.__dict__.setdefault("_fused_norms", {}).update({nq_name: nq, nk_name: nk})
            setattr(attn, nq_name, nn.Identity())
            setattr(attn, nk_name, nn.Identity())
            count += 1
    return count


def unfuse_qk_norm(model: nn.Module) -> int:
    """Undo fuse_qk_norm, in place (the norms back, the projections on quack_gemm); returns how many."""
    count = 0
    for attn in [m for m in model.modules() if isinstance(m, Attention)]:
        norms = attn.__dict__.pop("_fused_norms", {})
        for name, norm in norms.items():
            setattr(attn, name, norm)
        for fused, _, _ in QK_PAIRS:
            lin = getattr(attn, fused, None)
            if norms and type(lin) is FP8Linear and lin.gemm is quack_qknorm_gemm:
                lin.gemm = quack_gemm
                count += 1
    return count


def use_quack(model: nn.Module, enabled: bool = True) -> int:
    """Route `model`'s FP8 GEMMs through quack (or back to cuBLAS), in place; returns the layers set."""
    unfuse_qk_norm(model)  # the opt-in q/k-norm fusion is applied after this, never under it
    if enabled:
        register_ops()
    count = 0
    for mod in model.modules():
        if type(mod) in (FeedForward, QuackFeedForward):
            mod.__class__ = QuackFeedForward if enabled else FeedForward
        if type(mod) is QuackAttention:  # the opt-in join_qkv is applied after this, never under it
            mod.__class__ = Attention
        if type(mod) is FP8Linear:
            if enabled:
                _prepare(mod)
            mod.gemm = quack_gemm if enabled else cublas_gemm
            count += 1
    return count


def quack_version() -> str | None:
    """The installed quack-kernels version (None: not installed); a torch-fp8 set records it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quack-kernels")
    except PackageNotFoundError:
        return None


def quack_import_error() -> str | None:
    """None when quack's epilogue frontend and our epilogues import here, else why not (one line)."""
    return import_error(f"{__package__}.quack_epi", "quack")


@dataclass(frozen=True)
class GemmChoice:
    """What runs the FP8 GEMMs: `name` ('quack' or 'cublas') and `reason` (why not quack, or '')."""

    name: str
    reason: str = ""


def select_gemm(device_type: str, capability: tuple[int, int] | None, quack_error: str | None,
                asked: str = "auto") -> GemmChoice:
    """The decision alone, from facts: device type, CUDA capability (None off CUDA), `quack_error`
    (None when quack imports), and what the caller asked ('auto', 'quack' or 'cublas')."""
    if asked == "cublas":
        return GemmChoice("cublas", "asked for cuBLAS")
    sm = f"sm{capability[0]}{capability[1]}" if capability else device_type
    if device_type != "cuda" or capability is None or capability[0] not in MAJORS:
        why = f"{sm}: the quack FP8 GEMM is configured for sm90 only"
    elif quack_error is not None:
        why = f"{sm}: {quack_error}; {INSTALL_HINT}"
    else:
        return GemmChoice("quack")
    if asked == "quack":
        from ..errors import InvalidInputError

        raise InvalidInputError(f"gemm='quack' cannot run here ({why}); use gemm='auto' or 'cublas'")
    return GemmChoice("cublas", why)


def check_gemm(asked: str) -> str:
    """`asked`, checked (InvalidInputError naming the value and the choices): before any loading."""
    if asked not in ("auto", "quack", "cublas"):
        from ..errors import InvalidInputError

        raise InvalidInputError(f"torch-fp8 gemm={asked!r}; use 'auto' (quack on sm90 when it imports), "
                                f"'quack' or 'cublas'")
    return asked


def choose_gemm(device: torch.device | str, asked: str = "auto") -> GemmChoice:
    """quack on sm90 when it imports, cuBLAS otherwise (`asked='quack'` where it cannot run raises)."""
    check_gemm(asked)
    device = torch.device(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    probe = asked != "cublas" and device.type == "cuda" and capability[0] in MAJORS
    return select_gemm(device.type, capability, quack_import_error() if probe else None, asked)
