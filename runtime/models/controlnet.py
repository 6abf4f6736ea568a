"""The SD3 / SD3.5 ControlNet in plain torch (no diffusers at run time).

Parameter names and semantics follow diffusers' SD3ControlNetModel, so a diffusers ControlNet
folder's safetensors load with `load_state_dict(strict=True)`. Two architectures, read from the
folder's config.json:
  InstantX style (SD3 Medium ControlNets): own patch embedding with its position table, joint
    blocks over image + text (none of them `context_pre_only`), `force_zeros_for_pooled_projection`
    (the pipeline feeds zeros as pooled projections and encodes the control image without the VAE
    shift);
  SD3.5 Large style (Stability's canny / depth / blur): `joint_attention_dim: null` (no text
    stream: image-only blocks, no context embedder) and `use_pos_embed: false` (the MMDiT's own
    patch embedding is used, copied from the transformer at load).
forward(latent [B, 16, h, w], cond [B, 16 + extra, h, w], timestep [B], context [B, S, 4096],
pooled [B, 2048]) -> residuals [R, B, h*w/p^2, D] (R = num_layers), unscaled: the caller multiplies
by the conditioning scale (diffusers multiplies the same values inside the model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import TransformerSpec
from ..errors import CheckpointError
from ..weights import load_module, load_state_dict
from .mmdit import AdaNorm, Attention, FeedForward, JointBlock, _layer_norm, _PatchEmbed, _TimeTextEmbed, _affine


@dataclass(frozen=True)
class ControlNetSpec:
    """SD3ControlNetModel's config; missing keys take diffusers' defaults."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int | None = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int | None = 96
    extra_conditioning_channels: int = 0
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    pos_embed_type: str | None = "sincos"
    use_pos_embed: bool = True
    force_zeros_for_pooled_projection: bool = True

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def cond_channels(self) -> int:
        return self.in_channels + self.extra_conditioning_channels

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: Path | str = "") -> ControlNetSpec:
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        kwargs["dual_attention_layers"] = tuple(cfg.get("dual_attention_layers") or ())
        spec = cls(**kwargs)
        if spec.use_pos_embed and (spec.pos_embed_type != "sincos" or spec.pos_embed_max_size is None):
            raise CheckpointError(
                f"{source}: use_pos_embed with pos_embed_type={spec.pos_embed_type!r}, pos_embed_max_size="
                f"{spec.pos_embed_max_size!r} is not supported (a stored sincos table is: set pos_embed_max_size)")
        return spec

    def to_config(self) -> dict[str, Any]:
        cfg = {f.name: getattr(self, f.name) for f in fields(self)}
        cfg["dual_attention_layers"] = list(self.dual_attention_layers)
        return {"_class_name": "SD3ControlNetModel", **cfg}

    def block_spec(self) -> TransformerSpec:
        """The TransformerSpec its joint blocks (and its own patch embedding) are built from."""
        return TransformerSpec(
            num_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim, caption_projection_dim=self.caption_projection_dim,
            pos_embed_max_size=self.pos_embed_max_size or 0, sample_size=self.sample_size,
            joint_attention_dim=self.joint_attention_dim or 0, pooled_projection_dim=self.pooled_projection_dim,
            patch_size=self.patch_size, in_channels=self.in_channels, out_channels=self.out_channels,
            qk_norm=self.qk_norm, dual_attention_layers=self.dual_attention_layers)

    def check_transformer(self, t: TransformerSpec, source: Path | str = "") -> None:
        """Refuse a ControlNet whose residuals cannot be added to the MMDiT `t`'s image stream."""
        mine = (self.inner_dim, self.patch_size, self.in_channels)
        theirs = (t.inner_dim, t.patch_size, t.in_channels)
        if mine != theirs:
            raise CheckpointError(
                f"{source}: this ControlNet (width, patch, channels) = {mine} does not fit the model's "
                f"transformer {theirs}; use a ControlNet trained for this SD3.5 variant")


class SingleBlock(nn.Module):
    """diffusers' SD3SingleTransformerBlock: AdaLN-Zero, image-only attention, feed-forward."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.norm1 = AdaNorm(dim, 6)
        self.attn = Attention(dim, heads, qk_norm=False, joint=False, context_out=False)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        x = x + gate[:, None] * self.attn(_affine(_layer_norm(x, self.dim), shift, scale))[0]
        return x + gate_mlp[:, None] * self.ff(_affine(_layer_norm(x, self.dim), shift_mlp, scale_mlp))


class _CondEmbed(nn.Module):
    """pos_embed_input: a patchifying conv, no position table ([B, C, h, w] -> [B, h*w/p^2, D])."""

    def __init__(self, spec: ControlNetSpec) -> None:
        super().__init__()
        p = spec.patch_size
        self.proj = nn.Conv2d(spec.cond_channels, spec.inner_dim, kernel_size=p, stride=p)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.proj(cond).flatten(2).transpose(1, 2)


class SD3ControlNet(nn.Module):
    """diffusers' SD3ControlNetModel; `transformer` is the MMDiT's spec, whose patch embedding a
    `use_pos_embed: false` ControlNet shares (its weights are then loaded from the transformer)."""

    def __init__(self, spec: ControlNetSpec, transformer: TransformerSpec | None = None) -> None:
        super().__init__()
        self.spec = spec
        d, heads = spec.inner_dim, spec.num_attention_heads
        if not spec.use_pos_embed and transformer is None:
            raise CheckpointError("a ControlNet with use_pos_embed=false needs the transformer's spec "
                                  "(it shares the transformer's patch embedding)")
        self.pos_embed = _PatchEmbed(spec.block_spec() if spec.use_pos_embed else transformer)
        self.time_text_embed = _TimeTextEmbed(d, spec.pooled_projection_dim)
        self.joint = spec.joint_attention_dim is not None
        if self.joint:
            self.context_embedder = nn.Linear(spec.joint_attention_dim, spec.caption_projection_dim)
            blocks = [JointBlock(spec.block_spec(), i, context_pre_only=False) for i in range(spec.num_layers)]
        else:
            blocks = [SingleBlock(d, heads) for _ in range(spec.num_layers)]
        self.transformer_blocks = nn.ModuleList(blocks)
        self.controlnet_blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(spec.num_layers))
        self.pos_embed_input = _CondEmbed(spec)

    def forward(self, latent: torch.Tensor, cond: torch.Tensor, timestep: torch.Tensor,
                context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        x = self.pos_embed(latent)  # [B, N, D]
        if not self.joint:  # context unused: an exact zero from it keeps it an input of the traced graph
            timestep = timestep + context[:, :0, 0].float().sum(1)  # [B] + [B] zeros
        temb = self.time_text_embed(timestep, pooled)  # [B, D]
        x = x + self.pos_embed_input(cond.to(x.dtype))
        ctx = self.context_embedder(context) if self.joint else None  # [B, S, D]
        out = []
        for block, head in zip(self.transformer_blocks, self.controlnet_blocks):
            if self.joint:
                x, ctx = block(x, ctx, temb)
            else:
                x = block(x, temb)
            out.append(head(x))
        return torch.stack(out)  # [R, B, N, D]


def shared_pos_embed(transformer_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MMDiT's patch-embedding tensors, which a `use_pos_embed: false` ControlNet runs with."""
    return {k: v for k, v in transformer_state.items() if k.startswith("pos_embed.")}


def residual_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """SD3MultiControlNetModel's merge: elementwise sums of the nets' residuals, zipped (so the
    shortest list of residuals sets how many there are). `parts`: [R_k, B, N, D] each."""
    n = min(p.shape[0] for p in parts)
    total = parts[0][:n]
    for p in parts[1:]:
        total = total + p[:n]
    return total  # [min R_k, B, N, D]


def read_spec(folder: Path) -> ControlNetSpec:
    """The ControlNetSpec of a diffusers ControlNet folder (its config.json)."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder} has no config.json; pass a diffusers SD3ControlNetModel folder "
                              f"(config.json + diffusion_pytorch_model.safetensors)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("_class_name", "SD3ControlNetModel") != "SD3ControlNetModel":
        raise CheckpointError(f"{cfg_file} describes a {cfg['_class_name']}, not an SD3ControlNetModel; pass an "
                              f"SD3 / SD3.5 ControlNet")
    return ControlNetSpec.from_config(cfg, folder)


def load_controlnet(folder: str | Path, transformer: TransformerSpec, pos_embed_state: Callable[[], dict],
                    device: torch.device, dtype: torch.dtype) -> SD3ControlNet:
    """Our SD3ControlNet from a diffusers folder, strictly loaded, in eval mode on `device`
    (`controlnet_file.load_any` also takes Stability's single file).
    `pos_embed_state()` gives the MMDiT's `pos_embed.*` tensors (read only for a ControlNet that
    shares the transformer's patch embedding)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"controlnet={str(folder)!r} is not a folder; pass a diffusers ControlNet folder "
                              f"(config.json + diffusion_pytorch_model.safetensors) or Stability's .safetensors file")
    spec = read_spec(folder)
    spec.check_transformer(transformer, folder)
    state = load_state_dict(folder)
    if not spec.use_pos_embed:
        state.update(pos_embed_state())
    with torch.device("meta"):
        module = SD3ControlNet(spec, transformer)
    return load_module(module, state, folder, device, dtype)
