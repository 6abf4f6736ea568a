"""The SD3 VAE (16 latent channels) in plain torch: decoder and encoder.

Parameter names follow the `decoder.*` / `encoder.*` parts of diffusers' AutoencoderKL, so the
weights of a `vae/` folder load strictly. Decoder input: unscaled latents
(`z / scaling_factor + shift_factor`), output an image in [-1, 1]; encoder input: an image in
[-1, 1], output the posterior's moments, mean ++ log-variance (unscaled); the runtime samples it
(`runtime/edits.py`, as diffusers' DiagonalGaussianDistribution.sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VaeSpec


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _group_norm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.conv_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "conv_shortcut"):
            x = self.conv_shortcut(x)
        return x + h


class SpatialAttention(nn.Module):
    """Single-head self attention over all pixels, with residual (the mid-block attention)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = _group_norm(groups, channels)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        q, k, v = (f(t)[:, None] for f in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(layers)
        )
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample(c_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Module):
    def __init__(self, spec: VaeSpec) -> None:
        super().__init__()
        chans = list(reversed(spec.block_out_channels))
        g = spec.norm_num_groups
        self.conv_in = nn.Conv2d(spec.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], g)
        self.up_blocks = nn.ModuleList(
            UpBlock(chans[max(i - 1, 0)], c, spec.layers_per_block + 1, g, i < len(chans) - 1)
            for i, c in enumerate(chans)
        )
        self.conv_norm_out = _group_norm(g, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VaeDecoder(nn.Module):
    """latent [B, 16, H/8, W/8] (unscaled) -> image [B, 3, H, W] in [-1, 1]."""

    def __init__(self, spec: VaeSpec) -> None:
        super().__init__()
        self.spec = spec
        self.decoder = Decoder(spec)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)


class Downsample(nn.Module):
    """Stride-2 conv after a (0, 1, 0, 1) zero pad (diffusers' encoder downsampler, padding=0)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(layers))
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample(c_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, spec: VaeSpec) -> None:
        super().__init__()
        chans, g = list(spec.block_out_channels), spec.norm_num_groups
        self.conv_in = nn.Conv2d(3, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(chans[max(i - 1, 0)], c, spec.layers_per_block, g, i < len(chans) - 1)
            for i, c in enumerate(chans)
        )
        self.mid_block = MidBlock(chans[-1], g)
        self.conv_norm_out = _group_norm(g, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * spec.latent_channels, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(image)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # [B, 32, H/8, W/8]: mean ++ log-variance


class VaeEncoder(nn.Module):
    """image [B, 3, H, W] in [-1, 1] -> moments [B, 32, H/8, W/8]: mean ++ log-variance (unscaled)."""

    def __init__(self, spec: VaeSpec) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = Encoder(spec)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)  # [B, 32, H/8, W/8]
