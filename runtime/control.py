"""ControlNet conditioning of a request, as diffusers' StableDiffusion3ControlNetPipeline does it.

What a call does with ControlNets (facts from diffusers 0.42, our own code):
  1. control_image: PIL / numpy through the same preprocessing as `image` ([-1, 1], resized to
     height x width); a torch tensor is taken as it is ([K, 3, H, W], already in [-1, 1]); one image
     serves the whole batch, else one per prompt (repeated num_images_per_prompt times); with
     several nets, one entry per net, None for a net that sits the call out (our extension: the
     server picks one of its nets per request so);
  2. under CFG the images are doubled ([x; x]) BEFORE the VAE, the posterior sampled
     (mean + std * N(0, 1) from `control_generator`, or torch's global RNG as diffusers), then
     (z - shift) * scale, shift = 0 when the (first) ControlNet has
     force_zeros_for_pooled_projection (InstantX), else the VAE's shift_factor;
  3. per call i of n: keep_k = 0 if i / n < start_k or (i + 1) / n > end_k else 1; the residuals
     of net k are its outputs times controlnet_conditioning_scale_k * keep_k, summed over the nets
     (SD3MultiControlNetModel; zipped, so the net with fewest residuals sets their number);
  4. a ControlNet sees pooled projections of zeros when (the first net's config) says
     force_zeros_for_pooled_projection; the prompts' context is used only by a net with a context
     embedder (joint_attention_dim set); the MMDiT adds the residuals (runtime/models/mmdit.py).
The residuals are one more callable of the guidance (`guided(..., residuals=)`): the loop is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import VaeSpec
from .edits import sample_posterior
from .errors import InvalidInputError
from .images_in import preprocess
from .models.controlnet import ControlNetSpec, residual_sum
from .requests import Request

# residuals(x_in [B', 16, h, w], call index i, timestep [B']) -> extra transformer keyword arguments
Residuals = Callable[[torch.Tensor, int, torch.Tensor], dict[str, Any]]
# a ControlNet's callable: (latent, cond, timestep, context, pooled) -> residuals [R, B, N, D], unscaled
ControlNetCall = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ControlNet:
    path: Path
    spec: ControlNetSpec
    run: ControlNetCall


@dataclass(frozen=True)
class ControlNets:
    """The ControlNets a pipeline loaded; `multi`: given as a list (SD3MultiControlNetModel)."""

    nets: tuple[ControlNet, ...]
    multi: bool

    @property
    def first(self) -> ControlNetSpec:  # diffusers reads the shared settings from the first net
        return self.nets[0].spec


@dataclass(frozen=True)
class ControlRequest:
    images: tuple[torch.Tensor | None, ...]  # per net: [B, 3, H, W] in [-1, 1]; None: the net sits this call out
    scales: tuple[float, ...]  # per net
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    generator: torch.Generator | None  # the control posteriors' noise (None: torch's global RNG)


def _per_net(name: str, value: Any, n: int, multi: bool) -> tuple[float, ...]:
    items = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(items) != n:
        raise InvalidInputError(f"{name}={value!r} has {len(items)} entries for {n} ControlNet(s); pass one number "
                                f"or one per ControlNet")
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise InvalidInputError(f"{name}={value!r} must be a finite number (or one per ControlNet)")
    return tuple(float(v) for v in items)


def _image(value: Any, height: int, width: int, prompts: int, batch: int) -> torch.Tensor:
    if isinstance(value, torch.Tensor):  # diffusers takes a tensor as it is
        t = value[None] if value.dim() == 3 else value
        if t.dim() != 4 or t.shape[1] != 3 or tuple(t.shape[2:]) != (height, width) or not t.is_floating_point():
            raise InvalidInputError(f"control_image is a tensor of shape {tuple(value.shape)} ({value.dtype}); pass "
                                    f"floats [K, 3, {height}, {width}] in [-1, 1], or a PIL image")
        pixels = t.float()
    else:
        pixels = preprocess("control_image", value, height, width)  # [K, 3, H, W] in [-1, 1]
    k = pixels.shape[0]
    if k not in (1, prompts):
        raise InvalidInputError(f"control_image holds {k} images for {prompts} prompt(s); pass one image or one "
                                f"per prompt")
    return pixels.repeat_interleave(batch // k, dim=0)  # [B, 3, H, W], as diffusers' prepare_image


def check_control(nets: ControlNets | None, control_image: Any, scale: Any, start: Any, end: Any, height: int,
                  width: int, prompts: int, batch: int, generator: Any = None) -> ControlRequest | None:
    """The ControlNet part of a call, or InvalidInputError naming the argument; None without
    control_image (a pipeline with ControlNets then generates without them)."""
    if control_image is None:
        return None
    if nets is None:
        raise InvalidInputError("control_image was given but no ControlNet is loaded; load one with "
                                "Pipeline.from_pretrained(path, controlnet=PATH) or drop control_image")
    n = len(nets.nets)
    if nets.multi:
        if not isinstance(control_image, (list, tuple)) or len(control_image) != n:
            got = len(control_image) if isinstance(control_image, (list, tuple)) else type(control_image).__name__
            raise InvalidInputError(f"control_image must be a list of {n} entries (one per ControlNet), got {got}")
        images = tuple(None if v is None else _image(v, height, width, prompts, batch) for v in control_image)
        if all(v is None for v in images):
            return None
    else:
        images = (_image(control_image, height, width, prompts, batch),)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidInputError(f"control_generator={generator!r} must be a torch.Generator (or None)")
    scales = _per_net("controlnet_conditioning_scale", scale, n, nets.multi)
    starts = _per_net("control_guidance_start", start, n, nets.multi)
    ends = _per_net("control_guidance_end", end, n, nets.multi)
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise InvalidInputError(f"control_guidance_start={start!r} / control_guidance_end={end!r} must satisfy "
                                    f"0 <= start < end <= 1 (fractions of the steps)")
    return ControlRequest(images, scales, starts, ends, generator)


def encode_control(vae_encoder: Callable, vae: VaeSpec, nets: ControlNets, req: ControlRequest, cfg: bool,
                   device: torch.device) -> list[torch.Tensor]:
    """Each net's conditioning latents [B or 2B, 16, h, w] (step 2 above; None for a net sitting out)."""
    shift = 0.0 if _first(nets, req).force_zeros_for_pooled_projection else vae.shift_factor
    conds: list[torch.Tensor | None] = []
    for pixels in req.images:
        if pixels is None:
            conds.append(None)
            continue
        pixels = torch.cat([pixels, pixels]) if cfg else pixels  # [2B or B, 3, H, W]
        z = sample_posterior(vae_encoder(pixels.to(device)), req.generator)  # [2B or B, 16, h, w]
        conds.append((z - shift) * vae.scaling_factor)
    return conds


def keep(i: int, n: int, start: float, end: float) -> float:
    """1.0 inside the guidance window of call i of n, else 0.0 (diffusers' controlnet_keep)."""
    return 1.0 - float(i / n < start or (i + 1) / n > end)


def _first(nets: ControlNets, req: ControlRequest) -> ControlNetSpec:
    """The net whose config sets the shared choices: the first (diffusers), or the first taking part."""
    return next(n.spec for n, image in zip(nets.nets, req.images) if image is not None)


def residuals(nets: ControlNets, req: ControlRequest, conds: Sequence[torch.Tensor | None], context: torch.Tensor,
              pooled: torch.Tensor, calls: int) -> Residuals:
    """The guidance's residual callable for one request (steps 3 and 4 above)."""
    zeros = _first(nets, req).force_zeros_for_pooled_projection
    net_pooled = torch.zeros_like(pooled) if zeros else pooled  # [B', 2048]
    active = [k for k, c in enumerate(conds) if c is not None]

    def control(x: torch.Tensor, i: int, t: torch.Tensor) -> dict[str, Any]:
        scales = {k: req.scales[k] * keep(i, calls, req.starts[k], req.ends[k]) for k in active}
        if not any(scales.values()):  # adding zeros changes nothing: skip the ControlNets
            return {}
        parts = [nets.nets[k].run(x, conds[k], t, context, net_pooled) * scales[k] for k in active]
        return {"controlnet_residuals": residual_sum(parts)}  # [R, B', N, D]

    return control


def plan(nets: ControlNets, creq: ControlRequest, vae_encoder: Callable, vae: VaeSpec, req: Request,
         device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], Residuals]:
    """(context, pooled) -> the residual callable of `req`; the control images are encoded when it
    is called (after the prompts, before the noise, as diffusers orders its draws)."""
    cfg, calls = req.negatives is not None, len(req.sampler.calls(req.schedule))

    def make(context: torch.Tensor, pooled: torch.Tensor) -> Residuals:
        conds = encode_control(vae_encoder, vae, nets, creq, cfg, device)
        return residuals(nets, creq, conds, context, pooled, calls)

    return make


# The Pipeline call's ControlNet arguments (their defaults as diffusers').
CONTROL_ARGS = ("control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end",
                "control_generator")


def request_control(nets: ControlNets | None, req: Request, prompt: Any, control_image: Any = None,
                    controlnet_conditioning_scale: Any = 1.0, control_guidance_start: Any = 0.0,
                    control_guidance_end: Any = 1.0, control_generator: Any = None) -> ControlRequest | None:
    """check_control for a checked `req` (its size and batch; `prompt` as the call got it)."""
    creq = check_control(nets, control_image, controlnet_conditioning_scale, control_guidance_start,
                         control_guidance_end, req.height, req.width, 1 if isinstance(prompt, str) else len(prompt),
                         req.batch, control_generator)
    if creq is not None and req.slg is not None:
        raise InvalidInputError("skip_guidance_layers with control_image is not supported (diffusers' ControlNet "
                                "pipeline has no skip-layer guidance); drop one of them")
    return creq


def open_controlnets(paths: str | Path | Sequence[str | Path], backend: Any) -> ControlNets:
    """The ControlNets at `paths` (one folder, or a list: SD3MultiControlNetModel semantics) loaded
    by `backend` (its `load_controlnet(folder) -> (spec, callable)`)."""
    multi = isinstance(paths, (list, tuple))
    items = list(paths) if multi else [paths]
    if not items or not all(isinstance(p, (str, Path)) for p in items):
        raise InvalidInputError(f"controlnet={paths!r} must be a ControlNet folder or a non-empty list of them")
    if not getattr(backend, "controlnet", False):
        raise InvalidInputError(f"controlnet= needs a backend whose transformer takes ControlNet residuals; backend "
                                f"{backend.name!r} cannot: use backend='torch' or 'torch-fp8', or an export made "
                                f"with `sd35trt export --controlnet PATH` (onnxruntime, TensorRT)")
    if getattr(backend, "vae_encoder", None) is None:
        raise InvalidInputError(f"controlnet= needs the VAE encoder (control images are encoded), which backend "
                                f"{backend.name!r} has not loaded")
    nets = []
    for p in items:
        spec, run = backend.load_controlnet(Path(p))
        if spec.extra_conditioning_channels:
            raise InvalidInputError(f"controlnet={str(p)!r} takes {spec.extra_conditioning_channels} extra conditioning "
                                    f"channel(s) (an inpainting ControlNet); only image ControlNets are supported")
        nets.append(ControlNet(Path(p), spec, run))
    return ControlNets(tuple(nets), multi)
