"""The SD3 / SD3.5 MMDiT in plain torch (no diffusers at run time).

Parameter names follow diffusers' SD3Transformer2DModel, so a diffusers `transformer/` folder's
safetensors load with `load_state_dict(strict=True)`. Supports SD3.5 Large (QK RMS-norm) and
Medium (MMDiT-X: extra image self-attention in the first blocks). The forward returns the
velocity `v` with the latent's shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TransformerSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


def _layer_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return F.layer_norm(x, (dim,), eps=1e-6)  # static shape: ONNX export needs a constant


def _affine(x_norm: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x_norm * (1 + scale[:, None]) + shift[:, None]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    return _affine(_layer_norm(x, dim), shift, scale)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v on [B, N, heads, D] tensors (torch's SDPA wants heads first)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, N, heads, D]


class AdaNorm(nn.Module):
    """SiLU -> Linear producing `n` modulation vectors (AdaLayerNormZero/-X/-Continuous)."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.n, dim=1)


class FeedForward(nn.Module):
    """Linear(d, 4d) -> GELU(tanh) -> Linear(4d, d), named ff.net.0.proj / ff.net.2."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, 4 * dim)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(4 * dim, dim)])
        self.act = gelu_tanh  # torch-fp8 swaps in gelu_tanh_sigmoid (same function, cheaper kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.act(self.net[0].proj(x)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """GELU(tanh) written as x * sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3): the identity
    0.5 (1 + tanh z) = sigmoid(2z) makes it the same function, and a compiled sigmoid is far
    cheaper than an accurate tanh (the FF1 epilogue kernel was bound by tanh, not memory). Eager, it
    runs in place on one fp32 temporary (the same operations in the same order, so bitwise the same):
    the out-of-place chain held three [B, N, 4D] fp32 tensors, the largest activation at 1024²."""
    xf = x.float()
    if torch.compiler.is_compiling():  # inductor fuses the chain into one kernel: keep the graph as it was
        return (xf * torch.sigmoid(1.5957691216057308 * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)
    t = 0.044715 * xf  # a new tensor: x (which x.float() returns as it is when fp32) is never written
    t.mul_(xf).mul_(xf).add_(xf).mul_(1.5957691216057308).sigmoid_()  # ((c xf) xf) xf + xf = xf + c xf xf xf
    return t.mul_(xf).to(x.dtype)


def use_sigmoid_gelu(model: nn.Module, enabled: bool = True) -> None:
    """Switch every FeedForward of `model` to gelu_tanh_sigmoid (or back), in place."""
    for mod in model.modules():
        if isinstance(mod, FeedForward):
            mod.act = gelu_tanh_sigmoid if enabled else gelu_tanh


class Attention(nn.Module):
    """Self attention over the image stream, optionally joined with the context stream."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, joint: bool, context_out: bool) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim = dim // heads
        self.core = sdpa  # (q, k, v) [B, N, heads, head_dim] -> same; torch-fp8 may swap in FA4 (flash_attention.py)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        if qk_norm:
            self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            if qk_norm:
                self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        if context_out:
            self.to_add_out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))  # [B, N, heads, head_dim]

    def fuse_qkv(self) -> None:
        """One [3D, D] projection instead of q, k, v (and add_q/k/v): same math, one GEMM each."""
        for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")),
                             ("add_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            if hasattr(self, parts[0]):
                lin = [getattr(self, p) for p in parts]
                cat = nn.Linear(lin[0].in_features, 3 * lin[0].out_features, device=lin[0].weight.device,
                                dtype=lin[0].weight.dtype)
                cat.weight.data = torch.cat([m.weight.data for m in lin])
                cat.bias.data = torch.cat([m.bias.data for m in lin])
                setattr(self, fused, cat)
                for p in parts:
                    delattr(self, p)

    def _qkv(self, x: torch.Tensor, fused: str, parts: tuple[str, ...], nq: str, nk: str) -> tuple[torch.Tensor, ...]:
        if hasattr(self, fused):
            q, k, v = getattr(self, fused)(x).chunk(3, dim=-1)
        else:
            q, k, v = (getattr(self, p)(x) for p in parts)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if hasattr(self, nq):
            q, k = getattr(self, nq)(q), getattr(self, nk)(k)
        return q, k, v

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self._qkv(x, "to_qkv", ("to_q", "to_k", "to_v"), "norm_q", "norm_k")
        n_img = x.shape[1]
        if ctx is not None:  # joint attention: image tokens first, then text tokens
            cq, ck, cv = self._qkv(
                ctx, "add_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"), "norm_added_q", "norm_added_k"
            )
            q, k, v = torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1)
        return self._project(self.core(q, k, v).flatten(2).to(q.dtype), n_img, ctx)  # core: [B, N, dim]

    def _project(self, out: torch.Tensor, n_img: int, ctx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output [B, N, dim] -> (image stream's projection, context stream's or None)."""
        img, txt = out[:, :n_img], out[:, n_img:]
        img = self.to_out[0](img)
        if ctx is None or not hasattr(self, "to_add_out"):
            return img, None
        return img, self.to_add_out(txt)


class JointBlock(nn.Module):
    def __init__(self, spec: TransformerSpec, index: int, context_pre_only: bool | None = None) -> None:
        super().__init__()
        d, heads = spec.inner_dim, spec.num_attention_heads
        qk = spec.qk_norm is not None
        self.dim = d
        # context_pre_only: the MMDiT's last block (a ControlNet's blocks never are)
        self.last = index == spec.num_layers - 1 if context_pre_only is None else context_pre_only
        self.dual = index in spec.dual_attention_layers
        self.norm1 = AdaNorm(d, 9 if self.dual else 6)
        self.norm1_context = AdaNorm(d, 2 if self.last else 6)
        self.attn = Attention(d, heads, qk, joint=True, context_out=not self.last)
        if self.dual:
            self.attn2 = Attention(d, heads, qk, joint=False, context_out=False)
        self.ff = FeedForward(d)
        if not self.last:
            self.ff_context = FeedForward(d)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor, adaln: tuple | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`adaln`: (norm1's, norm1_context's chunks) precomputed by the model's AdaLNBank, else computed here."""
        mods, c_mods = (self.norm1(temb), self.norm1_context(temb)) if adaln is None else adaln
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x_norm = _layer_norm(x, self.dim)
        if self.last:
            c_scale, c_shift = c_mods  # AdaLayerNormContinuous: scale first
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
        attn, ctx_attn = self.attn(_affine(x_norm, shift, scale), _modulate(ctx, c_shift, c_scale, self.dim))
        x = x + gate[:, None] * attn
        if self.dual:  # MMDiT-X: a second, image-only attention on the same normalized input
            shift2, scale2, gate2 = mods[6:]
            x = x + gate2[:, None] * self.attn2(_affine(x_norm, shift2, scale2))[0]
        x = x + gate_mlp[:, None] * self.ff(_modulate(x, shift_mlp, scale_mlp, self.dim))
        if self.last:
            return x, ctx
        ctx = ctx + c_gate[:, None] * ctx_attn
        ctx = ctx + c_gate_mlp[:, None] * self.ff_context(_modulate(ctx, c_shift_mlp, c_scale_mlp, self.dim))
        return x, ctx


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of timesteps in [0, 1000] (diffusers' Timesteps(flip=True))."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


class _MLP2(nn.Module):
    """linear_1 -> SiLU -> linear_2 (TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d_in, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeTextEmbed(nn.Module):
    def __init__(self, d: int, pooled_dim: int) -> None:
        super().__init__()
        self.timestep_embedder = _MLP2(256, d)
        self.text_embedder = _MLP2(pooled_dim, d)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        temb = self.timestep_embedder(timestep_embedding(t).to(pooled.dtype))
        return temb + self.text_embedder(pooled)  # [B, D]


class _PatchEmbed(nn.Module):
    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        d, p, m = spec.inner_dim, spec.patch_size, spec.pos_embed_max_size
        self.patch, self.max_size = p, m
        self.proj = nn.Conv2d(spec.in_channels, d, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", torch.zeros(1, m * m, d))  # from the checkpoint

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h, w = latent.shape[-2] // self.patch, latent.shape[-1] // self.patch
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        pos = self.pos_embed.view(1, self.max_size, self.max_size, -1)
        pos = pos[:, top : top + h, left : left + w].reshape(1, h * w, -1)  # centre crop
        x = self.proj(latent).flatten(2).transpose(1, 2)  # [B, h*w, D]
        return x + pos.to(x.dtype)


class MMDiT(nn.Module):
    """forward(latent [B,16,H/8,W/8], timestep [B], context [B,77+T,4096], pooled [B,2048],
    skip_layers=None, controlnet_residuals=None): blocks whose index is in `skip_layers` are not run
    (their input passes through unchanged), as diffusers' SD3Transformer2DModel(skip_layers=...) for
    skip-layer guidance. `skip_layers` as a float tensor [num_layers] (1 = skip; the exported graphs'
    input) runs every block and selects its input or its output, so one traced graph serves plain and
    SLG passes. `controlnet_residuals` (a sequence of R tensors [B, h*w/p^2, D], or one
    [R, B, N, D] tensor) is diffusers' `block_controlnet_hidden_states`: after block i (skipped or
    not, but the last) the image stream gets residual int(i / (L / R)) added, L the block count."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.inner_dim
        self.pos_embed = _PatchEmbed(spec)
        self.time_text_embed = _TimeTextEmbed(d, spec.pooled_projection_dim)
        self.context_embedder = nn.Linear(spec.joint_attention_dim, spec.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(JointBlock(spec, i) for i in range(spec.num_layers))
        self.norm_out = AdaNorm(d, 2)
        self.proj_out = nn.Linear(d, spec.patch_size**2 * spec.out_channels)

    def forward(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        skip_layers: tuple[int, ...] | list[int] | torch.Tensor | None = None,
        controlnet_residuals: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        b, _, height, width = latent.shape
        p, c = self.spec.patch_size, self.spec.out_channels
        x = self.pos_embed(latent)  # [B, h*w, D]
        temb = self.time_text_embed(timestep, pooled)  # [B, D]
        ctx = self.context_embedder(context)  # [B, 77+T, D]
        flags = skip_layers if isinstance(skip_layers, torch.Tensor) else None  # [num_layers], 1 = skip
        skipped = frozenset(() if flags is not None else (skip_layers or ()))
        n_res = 0 if controlnet_residuals is None else len(controlnet_residuals)
        bank = getattr(self, "adaln_bank", None)  # adaln_bank.batch_adaln: every block's adaLN in one GEMM
        adaln = bank(temb) if bank is not None else [None] * len(self.transformer_blocks)
        for index, block in enumerate(self.transformer_blocks):
            if flags is not None:  # exported graphs: run the block, keep its input where flagged
                drop = flags[index] > 0.5  # [] bool
                new_x, new_ctx = block(x, ctx, temb, adaln[index])
                x, ctx = torch.where(drop, x, new_x), torch.where(drop, ctx, new_ctx)
            elif index not in skipped:
                x, ctx = block(x, ctx, temb, adaln[index])
            if n_res and not block.last:  # diffusers: interval = L / R, residual int(i / interval)
                x = x + controlnet_residuals[int(index / (len(self.transformer_blocks) / n_res))].to(x.dtype)
        scale, shift = self.norm_out(temb)
        x = self.proj_out(_modulate(x, shift, scale, self.spec.inner_dim))  # [B, h*w, p*p*C]
        x = x.view(b, height // p, width // p, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, h, p, w, p]
        return x.reshape(b, c, height, width)
