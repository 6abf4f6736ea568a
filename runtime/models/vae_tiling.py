"""Tiled VAE decode and encode, as diffusers' `AutoencoderKL.enable_tiling()` computes them.

An input larger than one tile is cut into overlapping square tiles (stride = tile x (1 - overlap)),
each tile runs through the VAE on its own, and every output tile is blended with the (already
blended) tile above it and the one to its left over `blend = out_tile x overlap` rows/columns with
linear weights (row y of the overlap: above x (1 - y/blend) + own x y/blend), then cropped to
`out_tile - blend` and the crops are concatenated. Memory for activations is that of one tile,
whatever the image size; the result differs slightly from the untiled one (each tile normalises
and attends on its own), as in diffusers. Inputs no larger than one tile run untiled, unchanged.

The wrapper is over any component callable of the Backend protocol (torch, ONNX Runtime, ...),
so it needs no weights of its own: `TiledVae(backend.vae_decoder, "decode", spec, 512)`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import VaeSpec
from ..errors import InvalidInputError

OVERLAP = 0.25  # diffusers' tile_overlap_factor
DEFAULT_TILE = 512  # pixels per tile side (64 latents); diffusers uses the VAE's sample_size (1024 for SD3)


def check_tile_size(tile: object, spec: VaeSpec) -> int:
    """`tile` (pixels per side) as an int, or InvalidInputError: a multiple of the VAE's factor (8),
    at least 2 latents."""
    f = spec.scale_factor
    if not (type(tile) is int and tile >= 2 * f and tile % f == 0):
        raise InvalidInputError(f"vae_tile_size={tile!r} must be an int >= {2 * f} and a multiple of {f} (pixels "
                                f"per tile side; default {DEFAULT_TILE})")
    return tile


def _blend_weights(n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - y/n, y/n) for y < n, as the python floats diffusers multiplies by, in `like`'s dtype."""
    own = torch.tensor([y / n for y in range(n)], dtype=torch.float64)
    return (1 - own).to(like.device, like.dtype), own.to(like.device, like.dtype)


def blend_v(above: torch.Tensor, tile: torch.Tensor, extent: int) -> torch.Tensor:
    """The first rows of `tile` faded in from the last rows of `above` (in place, returned)."""
    n = min(above.shape[2], tile.shape[2], extent)
    if n > 0:
        keep, own = _blend_weights(n, tile)
        tile[:, :, :n] = above[:, :, -n:] * keep[:, None] + tile[:, :, :n] * own[:, None]
    return tile


def blend_h(left: torch.Tensor, tile: torch.Tensor, extent: int) -> torch.Tensor:
    """The first columns of `tile` faded in from the last columns of `left` (in place, returned)."""
    n = min(left.shape[3], tile.shape[3], extent)
    if n > 0:
        keep, own = _blend_weights(n, tile)
        tile[:, :, :, :n] = left[:, :, :, -n:] * keep + tile[:, :, :, :n] * own
    return tile


def tiled(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_in: int, tile_out: int,
          overlap: float = OVERLAP) -> torch.Tensor:
    """`run` over overlapping tiles of `x` [B, C, H, W] (tile side `tile_in`), the outputs (side
    `tile_out` per tile) blended and cropped as diffusers' tiled_decode / _tiled_encode. Keeps one
    row of output tiles besides the current one."""
    stride = int(tile_in * (1 - overlap))
    blend = int(tile_out * overlap)
    limit = tile_out - blend
    above: list[torch.Tensor] | None = None
    rows = []
    for i in range(0, x.shape[2], stride):
        row: list[torch.Tensor] = []
        for j in range(0, x.shape[3], stride):
            t = run(x[:, :, i:i + tile_in, j:j + tile_in]).float()  # [B, C', <=tile_out, <=tile_out]
            if above is not None:
                t = blend_v(above[len(row)], t, blend)
            if row:
                t = blend_h(row[-1], t, blend)
            row.append(t)
        rows.append(torch.cat([t[:, :, :limit, :limit] for t in row], dim=3))
        above = row
    return torch.cat(rows, dim=2)


class TiledVae:
    """A VAE component callable that tiles inputs larger than one tile.

    kind "decode": latent [B, 16, h, w] -> image [B, 3, 8h, 8w], tiles of tile/8 latents;
    kind "encode": image [B, 3, H, W] -> moments [B, 32, H/8, W/8], tiles of `tile` pixels.
    """

    def __init__(self, call: Callable[[torch.Tensor], torch.Tensor], kind: str, spec: VaeSpec,
                 tile: int = DEFAULT_TILE, overlap: float = OVERLAP) -> None:
        if kind not in ("decode", "encode"):
            raise InvalidInputError(f"TiledVae kind={kind!r}; use 'decode' or 'encode'")
        self.call, self.kind, self.overlap = call, kind, overlap
        self.tile = check_tile_size(tile, spec)
        self.latent_tile = self.tile // spec.scale_factor
        self.model = getattr(call, "model", None)  # what runs it, as ComponentCall exposes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tile_in, tile_out = ((self.latent_tile, self.tile) if self.kind == "decode"
                             else (self.tile, self.latent_tile))
        if x.shape[-1] <= tile_in and x.shape[-2] <= tile_in:
            return self.call(x)
        with torch.inference_mode():  # the tiles of the torch backends are inference tensors: blended in place
            return tiled(self.call, x, tile_in, tile_out, self.overlap)
