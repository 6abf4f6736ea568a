"""`Pipeline`: the diffusers-shaped entry point over any backend.

A Pipeline holds only immutable state after construction (config, tokenizers behind locks, a
backend), so one instance may serve many threads; each call keeps its own latents and schedule.
`close()` refuses new calls, waits for the running ones, then frees the backend. `generate_async`
runs a call on a small thread pool owned by the pipeline, so an event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .backends import Backend, load_backend
from .backends.base import backend_class
from .checkpoint import Checkpoint
from .config import VariantConfig
from .control import CONTROL_ARGS, ControlNets, ControlRequest, open_controlnets, plan, request_control
from .edits import start as start_from_image
from .errors import ClosedError, GenerationCancelled, InvalidInputError, NonFiniteImageError
from .guidance import guided
from .image import to_pil
from .lora import LoraMixin
from .memory import MemorySettings, apply_memory
from .requests import Request, normalize_request
from .sampling import StepHook, Transformer, chain, initial_noise, run
from .text import PromptEncoder, load_tokenizers

# Options of `from_pretrained` that locate a single file's parts (the rest go to the backend).
CHECKPOINT_OPTIONS = ("clip_l", "clip_g", "t5", "tokenizers")
# diffusers-style callback: (pipe, step, timestep, {"latents": x}) -> dict; may return
# {"latents": new} to replace them, or {"cancel": True} to stop (raises GenerationCancelled).
StepCallback = Callable[["Pipeline", int, float, dict[str, torch.Tensor]], dict[str, Any] | None]


@dataclass
class PipelineOutput:
    images: Any  # list[PIL.Image] | np.ndarray [B, H, W, 3] in [0, 1] | latents tensor
    info: dict[str, Any] = field(default_factory=dict)


def seed_generators(seed: int, n: int = 1) -> list[torch.Generator]:
    """The generators of a request for `n` images from `seed`: image i draws its noise from
    `torch.Generator().manual_seed(seed + i)`. The server and the micro-batcher use this, so an
    image is the same whether its request ran alone or in a batch."""
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def sample(encode: PromptEncoder, transformer: Transformer, device: torch.device, req: Request,
           generator: Any = None, latents: torch.Tensor | None = None, on_step: StepHook | None = None,
           progress: bool = False, backend_name: str = "", vae_encoder: Any = None,
           control: Callable | None = None) -> torch.Tensor:
    """The final latents [B, 16, H/8, W/8] of a request: prompts encoded (negatives first under CFG),
    the start made (noise drawn, or `latents`; image modes: the image encoded by `vae_encoder` and
    noised, runtime/edits.py), the request's sampler run with its guidance (its noise, if any, from
    `generator`; `control`: (context, pooled) -> ControlNet residuals, runtime/control.py). The FP8
    calibration drives it too."""
    p, p2, p3 = req.prompts, req.prompts_2, req.prompts_3
    if req.negatives is not None:
        n, n2, n3 = req.negatives
        p, p2, p3 = n + p, n2 + p2, n3 + p3
    context, pooled = encode(p, p2, p3, req.max_sequence_length)  # [B or 2B, 77+T, 4096], [B or 2B, 2048]
    residuals = control(context, pooled) if control is not None else None
    shape = encode.config.latent_shape(req.batch, req.height, req.width)  # [B, 16, H/8, W/8]
    blend = None
    if req.image is not None:
        start = start_from_image(vae_encoder, encode.config.vae, req.image, req.mask, req.strength,
                                 req.sampler.calls(req.schedule), shape, generator, latents, device)
        x, blend = start.latents, start.on_step
    else:
        x = latents if latents is not None else initial_noise(shape, generator, device)
    predict = guided(transformer, context, pooled, req.guidance, req.slg, len(req.schedule), residuals)
    return run(predict, x.to(device), req.schedule, chain(blend, on_step), progress, backend_name, req.sampler,
               generator)


class Pipeline(LoraMixin):
    # Threads of the pool behind `generate_async` (calls beyond that wait for a free thread).
    async_workers = 4

    def __init__(self, config: VariantConfig, backend: Backend, tokenizers: tuple, path: Path) -> None:
        self.config = config
        self.backend = backend
        self.path = path
        self.encode = PromptEncoder(config, tokenizers, backend)
        self._state = threading.Condition()
        self._running = 0  # calls in progress
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._init_loras()
        self.controlnets: ControlNets | None = None  # from_pretrained(controlnet=...)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, backend: str | None = None, family: str | None = None, **options: Any
    ) -> Pipeline:
        """Load SD3.5 from a diffusers folder or a single-file checkpoint (`sd3.5_large.safetensors`
        with clip_l/clip_g[/t5xxl_*] .safetensors and tokenizer*/ folders beside it), an export
        folder or an engine set. `backend` defaults to what the path holds: torch for checkpoints,
        onnxruntime for export folders, an engine set's flavor. `family` (large|medium|large-turbo)
        overrides the one detected from the configs or shapes; `clip_l=`, `clip_g=`,
        `t5=`, `tokenizers=` point a single file at its other parts; `controlnet=` a ControlNet
        folder or a list of them (runtime/control.py); the remaining options (device, dtype,
        load_t5, ...) go to the backend. `memory=` default|balanced|low (with `vae_tiling`,
        `vae_tile_size`, `prompt_cache`) says which weights stay on the device (runtime/memory.py)."""
        controlnet = options.pop("controlnet", None)
        memory = MemorySettings.pop(options)  # a bad memory= fails before anything is read
        files = {k: options.pop(k) for k in CHECKPOINT_OPTIONS if k in options}
        if options.get("load_t5") is False:
            files["t5"] = False
        ckpt = Checkpoint.open(path, family=family, **files)
        tokenizers = load_tokenizers(ckpt)  # before any weights: a missing tokenizer fails fast
        name = backend or ckpt.default_backend
        memory.prepare(backend_class(name), name, options)  # refuses a backend that cannot move its weights
        if controlnet is not None:  # e.g. an export made without a ControlNet: refused before loading
            backend_class(name).check_controlnet(ckpt, ckpt.config, controlnet)
        pipe = cls(ckpt.config, load_backend(name, ckpt, ckpt.config, **options), tokenizers, ckpt.path)
        if controlnet is not None:
            try:
                pipe.controlnets = open_controlnets(controlnet, pipe.backend)
            except BaseException:
                pipe.close()
                raise
        return apply_memory(pipe, memory)

    def close(self) -> None:
        """Refuse new calls (ClosedError), wait for the running ones, then free the backend."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._state.wait_for(lambda: self._running == 0)
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_request(self, prompt: str | Sequence[str], **kwargs: Any) -> Request:
        """Validate the arguments of a call without running anything (raises InvalidInputError, or
        the backend's own error for a request it cannot take, e.g. outside an engine's profile);
        returns the request with every default resolved."""
        kwargs.pop("callback_on_step_end", None), kwargs.pop("progress", None)
        loras = kwargs.pop("loras", None)
        control = {k: kwargs.pop(k) for k in CONTROL_ARGS if k in kwargs}
        req = self.with_loras(normalize_request(self.config, prompt, **kwargs), loras)
        request_control(self.controlnets, req, prompt, **control)  # the ControlNet arguments (runtime/control.py)
        b = self.backend
        if req.image is not None and getattr(b, "vae_encoder", None) is None:
            raise InvalidInputError(f"image= ({req.mode}) needs the VAE encoder, which backend {b.name!r} has not "
                                    f"loaded for {self.path}; export it (`sd35trt export` writes vae_encoder.onnx) "
                                    f"or use backend='torch'")
        if req.slg is not None and not getattr(b, "skip_layers", False):
            raise InvalidInputError(f"skip_guidance_layers={list(req.slg.layers)} needs a transformer that can skip "
                                    f"blocks; backend {b.name!r} cannot yet (its exported graph has no skip input): "
                                    f"use backend='torch' or drop skip_guidance_layers")
        b.check_request(req.batch, req.height, req.width, req.max_sequence_length)
        return req

    async def generate_async(self, *args: Any, **kwargs: Any) -> PipelineOutput:
        """`await pipe.generate_async(prompt, ...)`: the same arguments and result as a call, run
        on the pipeline's thread pool. Cancelling the awaiting task stops the generation after its
        current denoising step (GenerationCancelled inside the worker thread)."""
        stop = threading.Event()
        user_callback = kwargs.pop("callback_on_step_end", None)

        def on_step(pipe: Pipeline, i: int, t: float, kw: dict[str, torch.Tensor]) -> dict[str, Any] | None:
            if stop.is_set():
                return {"cancel": True}
            return user_callback(pipe, i, t, kw) if user_callback is not None else None

        kwargs.setdefault("progress", False)
        call = functools.partial(self.__call__, *args, callback_on_step_end=on_step, **kwargs)
        future = asyncio.get_running_loop().run_in_executor(self._executor(), call)
        try:
            return await future
        except asyncio.CancelledError:
            stop.set()
            raise

    def _executor(self) -> ThreadPoolExecutor:
        with self._state:
            if self._closed:
                raise ClosedError(f"pipeline for {self.path} is closed; load it again with Pipeline.from_pretrained")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.async_workers, thread_name_prefix="sd35trt-pipeline")
            return self._pool

    def _enter(self) -> None:
        with self._state:
            if self._closed:
                raise ClosedError(f"pipeline for {self.path} is closed; load it again with Pipeline.from_pretrained")
            self._running += 1

    def _exit(self) -> None:
        with self._state:
            self._running -= 1
            self._state.notify_all()

    def __call__(
        self,
        prompt: str | Sequence[str],
        prompt_2: str | Sequence[str] | None = None,
        prompt_3: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        negative_prompt_3: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sigmas: Sequence[float] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int = 256,
        output_type: str = "pil",
        callback_on_step_end: StepCallback | None = None,
        progress: bool = True,
        sampler: str = "euler",
        image: Any = None,
        mask_image: Any = None,
        strength: float = 0.6,
        padding_mask_crop: int | None = None,
        skip_guidance_layers: Sequence[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_start: float = 0.01,
        skip_layer_guidance_stop: float = 0.2,
        loras: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        control_generator: torch.Generator | None = None,
    ) -> PipelineOutput:
        """diffusers' arguments: text-to-image; `image` -> image-to-image (StableDiffusion3Img2ImgPipeline,
        `strength` trims the schedule); `image` + `mask_image` -> inpainting (StableDiffusion3InpaintPipeline);
        `skip_guidance_layers` -> skip-layer guidance (StableDiffusion3Pipeline). `latents` with an image:
        the starting latents as they are (image-to-image) or the noise (inpainting), as diffusers.
        `loras={"style": 0.7}` (or one such dict per image): strengths of LoRAs loaded with `load_lora`.
        `control_image` (+ `controlnet_conditioning_scale`, `control_guidance_start`/`_end`) with the
        loaded ControlNets: StableDiffusion3ControlNetPipeline; `control_generator` draws the control
        images' posterior noise (None: torch's global RNG, as diffusers)."""
        req = self.check_request(  # raises before any heavy work
            prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sigmas=sigmas,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            max_sequence_length=max_sequence_length, output_type=output_type, sampler=sampler, image=image,
            mask_image=mask_image, strength=strength, padding_mask_crop=padding_mask_crop,
            skip_guidance_layers=skip_guidance_layers, skip_layer_guidance_scale=skip_layer_guidance_scale,
            skip_layer_guidance_start=skip_layer_guidance_start, skip_layer_guidance_stop=skip_layer_guidance_stop,
            loras=loras)
        creq = request_control(self.controlnets, req, prompt, control_image, controlnet_conditioning_scale,
                               control_guidance_start, control_guidance_end, control_generator)
        self._enter()
        try:
            return self._generate(req, generator, latents, callback_on_step_end, progress, creq)
        finally:
            self._exit()

    def _generate(self, req: Request, generator: Any, latents: torch.Tensor | None,
                  callback_on_step_end: StepCallback | None, progress: bool,
                  creq: ControlRequest | None = None) -> PipelineOutput:
        b = self.backend
        encode, transformer = self.lora_calls(req)
        control = None if creq is None else plan(self.controlnets, creq, b.vae_encoder, self.config.vae, req, b.device)
        x = sample(encode, transformer, b.device, req, generator, latents, self._hook(callback_on_step_end),
                   progress, b.name, getattr(b, "vae_encoder", None), control)
        info = {"mode": req.mode, "steps": len(req.schedule), "sampler": req.sampler.name, "guidance": req.guidance,
                "height": req.height, "width": req.width, "backend": self.backend.name, "variant": self.config.name}
        return PipelineOutput(self._decode(x, req), info)

    def _hook(self, callback: StepCallback | None):
        if callback is None:
            return None

        def on_step(i: int, t: float, x: torch.Tensor) -> torch.Tensor:
            out = callback(self, i, t, {"latents": x}) or {}
            if out.get("cancel"):
                raise GenerationCancelled(i)
            return out.get("latents", x)

        return on_step

    def _decode(self, x: torch.Tensor, req: Request) -> Any:
        if req.output_type == "latent":
            return x
        vae = self.config.vae
        image = self.backend.vae_decoder(x / vae.scaling_factor + vae.shift_factor)  # [B, 3, H, W]
        if not bool(torch.isfinite(image).all()):  # never hand out a black (NaN-clamped) image
            raise NonFiniteImageError(self.backend.name, float(x.abs().max()))
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        array: np.ndarray = image.cpu().permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
        if req.overlay is not None:  # padding_mask_crop: into the original's frame (PIL, as diffusers)
            pil = req.overlay.apply(to_pil(array))
            return pil if req.output_type == "pil" else np.stack([np.asarray(p, np.float32) / 255.0 for p in pil])
        return array if req.output_type == "np" else to_pil(array)
