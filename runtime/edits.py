"""Image-to-image and inpainting: the starting latents and the inpainting blend.

Same semantics as diffusers' StableDiffusion3Img2ImgPipeline / StableDiffusion3InpaintPipeline
with the 16-channel SD3.5 transformers, including their use of the generator:
  1. the image is VAE-encoded and its posterior SAMPLED (mean + std * N(0, 1), logvar clamped to
     [-30, 20]) from the generator, then shifted and scaled: (z - shift) * scale;
  2. the noise is drawn;
  3. x = sigma_0 * noise + (1 - sigma_0) * z (the scheduler's scale_noise at the trimmed
     schedule's first sigma); inpainting at strength 1 starts from the noise itself;
  4. inpainting only: diffusers then encodes the masked image too and samples its posterior
     (unused by a 16-channel transformer); we draw the same numbers and skip the encoder pass, so
     the generator ends in the same state;
  5. inpainting only: after every transformer call and sampler step, outside the mask the latents
     are replaced by the original re-noised to the call's sigma_next with the SAME noise:
     x = (1 - m) * (s * noise + (1 - s) * z) + m * x (s = 0 on the last step: z itself).
Generator lists: images are tiled to the batch first, then image i's posterior comes from
generator i (so a batched image equals its twin run alone); diffusers' inpainting instead samples
only the given images (generators 0..K-1) and tiles, which differs only for a list with fewer
images than the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .config import VaeSpec
from .samplers import Call, Generators, standard_normal

StepHook = Callable[[int, float, torch.Tensor], torch.Tensor]  # as sampling.StepHook


def _tile(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.repeat(batch // t.shape[0], *([1] * (t.dim() - 1)))  # [a, b] -> [a, b, a, b], as diffusers


def sample_posterior(moments: torch.Tensor, generator: Generators) -> torch.Tensor:
    """diffusers' DiagonalGaussianDistribution(moments).sample(generator): [B, 32, h, w] -> [B, 16, h, w]."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return mean + std * standard_normal(tuple(mean.shape), generator, mean.device)


def encode_images(vae_encoder: Callable[[torch.Tensor], torch.Tensor], vae: VaeSpec, pixels: torch.Tensor,
                  batch: int, generator: Generators, device: torch.device) -> torch.Tensor:
    """Scaled latents [batch, 16, h, w] of `pixels` [K, 3, H, W] in [-1, 1] (K divides batch)."""
    if isinstance(generator, (list, tuple)):
        pixels = _tile(pixels, batch)
        z = torch.cat([sample_posterior(vae_encoder(pixels[i : i + 1].to(device)), generator[i])
                       for i in range(batch)])
    else:
        z = sample_posterior(vae_encoder(pixels.to(device)), generator)  # [K, 16, h, w]
    return _tile((z - vae.shift_factor) * vae.scaling_factor, batch)  # [B, 16, h, w]


def scale_noise(z: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching forward process at `sigma` (the scheduler's scale_noise, fp32)."""
    s = torch.tensor(sigma, dtype=torch.float32, device=z.device)
    return s * noise + (1.0 - s) * z


@dataclass(frozen=True)
class Start:
    latents: torch.Tensor  # [B, 16, h, w] what the loop starts from
    on_step: StepHook | None  # the inpainting blend (None for image-to-image)


def burn_masked_draws(pixels: torch.Tensor, mask: torch.Tensor, generator: Generators, shape: tuple[int, ...]) -> None:
    """Advance `generator` as diffusers' encoding of the masked image does (step 4 above)."""
    k = max(pixels.shape[0], mask.shape[0])  # init_image * (mask < 0.5) broadcasts
    gens = generator[:k] if isinstance(generator, (list, tuple)) else generator
    standard_normal((k, *shape[1:]), gens, torch.device("cpu"))  # [K, 16, h, w], discarded


def blend_hook(z: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, calls: Sequence[Call]) -> StepHook:
    """Inpainting's per-call blend of the re-noised original outside `mask` [B, 1, h, w]."""
    keep = 1 - mask

    def on_step(i: int, timestep: float, x: torch.Tensor) -> torch.Tensor:
        proper = scale_noise(z, calls[i].sigma_next, noise) if i < len(calls) - 1 else z
        return keep * proper + mask * x

    return on_step


def start(vae_encoder: Callable, vae: VaeSpec, pixels: torch.Tensor, mask: torch.Tensor | None, strength: float,
          calls: Sequence[Call], shape: tuple[int, ...], generator: Generators, latents: torch.Tensor | None,
          device: torch.device) -> Start:
    """The starting latents (and the blend) of an image-to-image or inpainting request; `calls`
    are the trimmed schedule's transformer calls, `shape` the latents' [B, 16, h, w]."""
    batch = shape[0]
    if mask is None:
        if latents is not None:  # diffusers' image-to-image starts from given latents as they are
            return Start(latents.float().to(device), None)
        z = encode_images(vae_encoder, vae, pixels, batch, generator, device)
        noise = standard_normal(shape, generator, device)  # [B, 16, h, w]
        return Start(scale_noise(z, calls[0].sigma, noise), None)
    z = encode_images(vae_encoder, vae, pixels, batch, generator, device)
    noise = latents.float().to(device) if latents is not None else standard_normal(shape, generator, device)
    x = noise if latents is not None or strength == 1.0 else scale_noise(z, calls[0].sigma, noise)
    burn_masked_draws(pixels, mask, generator, shape)
    m = _tile(F.interpolate(mask, size=tuple(shape[2:])), batch).to(device)  # [B, 1, h, w], nearest
    return Start(x, blend_hook(z, noise, m, calls))
