"""Tiled VAE decode / encode equal diffusers' tiled AutoencoderKL (enable_tiling) on the tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd35trt.runtime import InvalidInputError
from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.config import VaeSpec
from sd35trt.runtime.models.loader import load_modules
from sd35trt.runtime.models.vae_tiling import TiledVae, check_tile_size

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) is the reference tiled VAE")

TILE = 32  # pixels: 4 latents per tile, so a 80 x 112 image needs 3 x 4 tiles


@pytest.fixture(scope="module")
def vaes(tiny_medium: Path):
    """(our decoder, our encoder, diffusers' AutoencoderKL with tiling on, tiles as ours), fp32, CPU."""
    ckpt = Checkpoint.open(tiny_medium)
    mods = load_modules(ckpt, ["vae_decoder", "vae_encoder"], torch.device("cpu"), torch.float32)
    ref = diffusers.AutoencoderKL.from_pretrained(tiny_medium / "vae").eval()
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = TILE, TILE // ckpt.config.vae.scale_factor
    return mods["vae_decoder"], mods["vae_encoder"], ref, ckpt.config.vae


class Counting:
    """A module call that counts its calls (how many tiles ran)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.calls = module, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.module(x)


@torch.no_grad()
@pytest.mark.parametrize("hw", [(10, 14), (7, 12)])  # latents: an edge tile of 1 (10 = 0, 3, 6, 9) / uneven sides
def test_tiled_decode_equals_diffusers(vaes, hw) -> None:
    dec, _, ref, spec = vaes
    z = torch.randn(2, 16, *hw, generator=torch.Generator().manual_seed(0))  # [B, 16, h, w] unscaled
    run = Counting(dec)
    ours = TiledVae(run, "decode", spec, TILE)(z)
    theirs = ref.decode(z).sample  # [B, 3, 8h, 8w]
    assert ours.shape == theirs.shape == (2, 3, hw[0] * 8, hw[1] * 8)
    assert run.calls >= 6
    err = (ours - theirs).abs().max().item()
    untiled = dec(z)
    assert err <= 1e-4, err
    assert (untiled - theirs).abs().max().item() > 1e-2  # tiling changes the result: the test can tell
    assert theirs.std() > 0.05


@torch.no_grad()
@pytest.mark.parametrize("hw", [(80, 112), (56, 96)])
def test_tiled_encode_equals_diffusers(vaes, hw) -> None:
    _, enc, ref, spec = vaes
    image = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1)) * 2 - 1  # [B, 3, H, W]
    run = Counting(enc)
    ours = TiledVae(run, "encode", spec, TILE)(image)
    theirs = ref.encode(image).latent_dist.parameters  # moments [B, 32, H/8, W/8]
    assert ours.shape == theirs.shape == (2, 32, hw[0] // 8, hw[1] // 8)
    assert run.calls >= 6
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (enc(image) - theirs).abs().max().item() > 1e-3


@torch.no_grad()
def test_inputs_within_one_tile_run_untiled_unchanged(vaes) -> None:
    dec, enc, ref, spec = vaes
    z = torch.randn(1, 16, 4, 3, generator=torch.Generator().manual_seed(2))  # [1, 16, 4, 3]: one tile
    image = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    run_d, run_e = Counting(dec), Counting(enc)
    assert torch.equal(TiledVae(run_d, "decode", spec, TILE)(z), dec(z)) and run_d.calls == 1
    assert torch.equal(TiledVae(run_e, "encode", spec, TILE)(image), enc(image)) and run_e.calls == 1
    assert (dec(z) - ref.decode(z).sample).abs().max().item() <= 1e-4  # diffusers does not tile it either


@pytest.mark.parametrize("bad", [12, 4, 0, 33.0, "512", True])
def test_bad_tile_size_is_refused(bad) -> None:
    with pytest.raises(InvalidInputError, match="vae_tile_size="):
        check_tile_size(bad, VaeSpec())
