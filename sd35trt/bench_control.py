"""`sd35trt bench --configs control[:<fp8 config>]`: one CFG step of SD3.5 Large with one ControlNet
of the released size, ours (torch-fp8) against diffusers eager BF16, one process, one run.

A step is what StableDiffusion3ControlNetPipeline does per denoising call: the ControlNet forward
(latents, VAE-encoded control image, timestep, pooled projections) and the MMDiT forward with its
residuals. Random weights at real shapes, seeded: the MMDiT as `sd35trt bench` makes it, the
ControlNet as Stability's SD3.5 Large canny / depth / blur nets are built (RELEASED_LARGE below:
19 image-only blocks of width 2432, the MMDiT's patch embedding shared, real pooled projections).
  peer  diffusers SD3Transformer2DModel + SD3ControlNetModel, eager bf16, holding the same tensors;
  ours  our MMDiT + SD3ControlNet with FP8 GEMMs from one joint max calibration of both (the
        statistic `export_controlnet` computes jointly with ModelOpt), compiled as one step
        module like `sd35trt bench`'s fp8 configs (default: the runtime's reduce-overhead + fast
        accumulation + sigmoid GELU), under the chosen SDPA backend. The runtime's torch-fp8
        backend compiles only the MMDiT today (its ControlNet runs eager FP8 GEMMs), so this row
        is the step the backend reaches once it compiles the ControlNet too.
Reported: median step ms (CUDA events after warm-ups; wall clock on the CPU), peak memory, the
ratio peer / ours and the step cosine vs the peer's output; JSON rows + a summary at `out`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sd35trt.bench import (EXCLUDE, Runner, attention_ctx, diffusers_peer, fidelity, fp8_config, free,
                           inductor_options, random_init, random_mmdit, set_fp8_options, step_inputs)
from sd35trt.runtime.config import VARIANTS, VariantConfig
from sd35trt.runtime.models.controlnet import ControlNetSpec, SD3ControlNet
from sd35trt.runtime.models.mmdit import MMDiT

DEFAULT_CONFIG = "fp8-compile-reduce-overhead+fast+gelu"
PEER = "diffusers eager bf16, transformer + controlnet"
# The SD3.5 Large ControlNets' architecture (canny, depth and blur share it): diffusers'
# scripts/convert_sd3_controlnet_to_diffusers.py builds SD3ControlNetModel(...) with these for
# Stability's sd3.5_large_controlnet_{canny,depth,blur}.safetensors (it maps 19 blocks).
RELEASED_LARGE = {"patch_size": 2, "in_channels": 16, "num_layers": 19, "attention_head_dim": 64,
                  "num_attention_heads": 38, "joint_attention_dim": None, "caption_projection_dim": 2048,
                  "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": None,
                  "pos_embed_type": None, "use_pos_embed": False, "force_zeros_for_pooled_projection": False}
PARTS = ("transformer", "controlnet")  # the joint module's children, as export_controlnet names them


def control_spec(config: VariantConfig) -> ControlNetSpec:
    """The released ControlNet for SD3.5 Large; for other (tiny) transformers the same style with
    half the MMDiT's blocks (19 of Large's 38), so one residual serves two blocks as in the release."""
    t = config.transformer
    if config.family == "large" and t.num_layers == 38:
        cfg = RELEASED_LARGE
    else:
        cfg = {**RELEASED_LARGE, "num_layers": max(1, t.num_layers // 2), "attention_head_dim": t.attention_head_dim,
               "num_attention_heads": t.num_attention_heads, "caption_projection_dim": t.caption_projection_dim,
               "pooled_projection_dim": t.pooled_projection_dim}
    spec = ControlNetSpec.from_config({**cfg, "sample_size": t.sample_size})
    spec.check_transformer(t)
    return spec


def random_controlnet(spec: ControlNetSpec, mmdit: MMDiT, device: str, seed: int = 2,
                      dtype: torch.dtype = torch.bfloat16) -> SD3ControlNet:
    """A ControlNet of `spec` with seeded N(0, 0.02) weights (none zero, unlike diffusers' init of
    controlnet_blocks / pos_embed_input) and the MMDiT's patch embedding, as `load_controlnet` gives it."""
    with torch.device("meta"):
        net = SD3ControlNet(spec, mmdit.spec)
    net = random_init(net, device, seed, dtype)
    if not spec.use_pos_embed:
        net.pos_embed.load_state_dict(mmdit.pos_embed.state_dict())
    return net


def diffusers_controlnet(net: SD3ControlNet):
    """diffusers' SD3ControlNetModel holding `net`'s tensors (our names are diffusers'); a net that
    shares the transformer's patch embedding gets it as the pipeline does (its PatchEmbed)."""
    from diffusers import SD3ControlNetModel
    from diffusers.models.embeddings import PatchEmbed

    cfg = {k: v for k, v in net.spec.to_config().items() if not k.startswith("_")}
    t = net.pos_embed
    with torch.device("meta"):
        peer = SD3ControlNetModel(**cfg)
        if peer.pos_embed is None:  # as StableDiffusion3ControlNetPipeline: _get_pos_embed_from_transformer
            size = int(t.pos_embed.shape[1] ** 0.5)
            peer.pos_embed = PatchEmbed(height=net.spec.sample_size, width=net.spec.sample_size,
                                        patch_size=net.spec.patch_size, in_channels=net.spec.in_channels,
                                        embed_dim=net.spec.inner_dim, pos_embed_max_size=size)
    peer.load_state_dict(net.state_dict(), strict=True, assign=True)
    return peer.eval().requires_grad_(False)


class ControlStep(nn.Module):
    """One ControlNet-conditioned transformer call: residuals = scale * ControlNet(...), then the MMDiT."""

    def __init__(self, transformer: MMDiT, controlnet: SD3ControlNet, scale: float = 1.0) -> None:
        super().__init__()
        self.transformer, self.controlnet, self.scale = transformer, controlnet, scale
        self.zeros = controlnet.spec.force_zeros_for_pooled_projection

    def forward(self, latent, timestep, context, pooled, cond) -> torch.Tensor:
        net_pooled = torch.zeros_like(pooled) if self.zeros else pooled  # [B, 2048]
        res = self.controlnet(latent, cond, timestep, context, net_pooled) * self.scale  # [R, B, N, D]
        return self.transformer(latent, timestep, context, pooled, controlnet_residuals=res)  # [B, 16, h, w]


def peer_step(transformer, controlnet, args, cond: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The pipeline's denoising call (diffusers 0.42 StableDiffusion3ControlNetPipeline.__call__)."""
    lat, t, ctx, pooled = args
    net_pooled = torch.zeros_like(pooled) if controlnet.config.force_zeros_for_pooled_projection else pooled
    net_ctx = ctx if controlnet.context_embedder is not None else None
    res = controlnet(hidden_states=lat, timestep=t, encoder_hidden_states=net_ctx, pooled_projections=net_pooled,
                     controlnet_cond=cond, conditioning_scale=scale, return_dict=False)[0]
    return transformer(hidden_states=lat, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled,
                       block_controlnet_hidden_states=res, return_dict=False)[0]


def control_latents(config: VariantConfig, size: int, batch: int, device: str, dtype: torch.dtype,
                    seed: int = 4) -> torch.Tensor:
    """The VAE-encoded control image of a CFG step ([x; x] as the pipeline doubles it): [2B, 16, S/8, S/8]."""
    g = torch.Generator(device=device).manual_seed(seed)
    one = torch.randn(config.latent_shape(batch, size, size), generator=g, device=device, dtype=dtype)
    return torch.cat([one, one])


class DeviceRunner(Runner):
    """Runner on CUDA (events, peak memory) or the CPU (wall clock; the smoke run of the same path)."""

    def __init__(self, out: Path, device: str) -> None:
        super().__init__(out)
        self.cuda = torch.device(device).type == "cuda"

    def record(self, name: str, fn: Callable[[], torch.Tensor], ref: torch.Tensor | None = None,
               warmup: int = 3, iters: int = 10, **extra) -> torch.Tensor:
        if self.cuda:
            return super().record(name, fn, ref, warmup, iters, **extra)
        t0 = time.perf_counter()
        y = fn()
        first = time.perf_counter() - t0
        fid = fidelity(y, ref) if ref is not None else {}
        y = y.clone()
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        row = {"name": name, "step_ms": round(statistics.median(times), 2), "first_call_s": round(first, 1),
               "peak_gib": 0.0, **fid, **extra}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.out.write_text(json.dumps(self.rows, indent=1))
        return y


def bench_control(preset: str | VariantConfig, size: int, batch: int, out: Path, config: str = DEFAULT_CONFIG,
                  attention: str = "cudnn", device: str = "cuda", warmup: int = 3, iters: int = 10,
                  scale: float = 1.0) -> dict:
    """Time the peer's and our ControlNet step (rows at `out`, then the summary appended); returns the summary."""
    mode, flags = fp8_config(config)  # a bad name fails before any setup
    cfg = VARIANTS[preset] if isinstance(preset, str) else preset
    bf16, runner = torch.bfloat16, DeviceRunner(out, device)
    model = random_mmdit(cfg, bf16, device)
    net = random_controlnet(control_spec(cfg), model, device)
    args = step_inputs(cfg, size, batch, device, bf16)
    cond = control_latents(cfg, size, batch, device, bf16)
    with torch.no_grad():
        peer_tf, peer_cn = diffusers_peer(model, cfg), diffusers_controlnet(net)  # the same tensors: no extra memory
        ref = runner.record(PEER, lambda: peer_step(peer_tf, peer_cn, args, cond, scale), warmup=warmup, iters=iters)
        runner.record("diffusers eager bf16, controlnet alone",
                      lambda: peer_cn(hidden_states=args[0], timestep=args[1], pooled_projections=args[3],
                                      controlnet_cond=cond, return_dict=False)[0][0], warmup=warmup, iters=iters)
        del peer_tf, peer_cn
        free()
    step = ControlStep(model, net, scale)
    exclude = tuple(f"{part}.{pat}" for part in PARTS for pat in EXCLUDE)
    with torch.no_grad(), attention_ctx(attention):
        from sd35trt.runtime.models.fp8 import FP8Linear, max_calibrate, to_fp8

        amax = max_calibrate(step, lambda m: m(*args, cond), exclude)  # joint: both nets in one pass
        step = to_fp8(step, amax)  # in place: the bf16 Linears go (the peer is gone)
        free()
        set_fp8_options(step, flags)
        torch._dynamo.reset()
        options = None if mode is None else inductor_options(mode, "tune" in flags, "mk" in flags)
        fn = step if options is None else torch.compile(step, fullgraph=True, options=options)
        name = f"ours {'eager' if mode is None else 'compile ' + mode} fp8{''.join(' +' + f for f in sorted(flags))}"
        runner.record(f"{name}, transformer + controlnet [{'fa4' if 'fa4' in flags else attention}]",
                      lambda: fn(*args, cond), ref, warmup=warmup, iters=iters)
    peer, ours = runner.rows[0], runner.rows[-1]
    summary = {"preset": cfg.name, "size": size, "batch": batch, "config": config, "device": device,
               "controlnet": {k: v for k, v in control_spec(cfg).to_config().items() if k != "_class_name"},
               "fp8_layers": sum(isinstance(m, FP8Linear) for m in step.modules()),
               "fp8_layers_controlnet": sum(isinstance(m, FP8Linear) for m in step.controlnet.modules()),
               "peer_ms": peer["step_ms"], "ours_ms": ours["step_ms"],
               "ratio": round(peer["step_ms"] / ours["step_ms"], 3), "step_cos": ours["cos_vs_bf16"],
               "peer_peak_gib": peer["peak_gib"], "ours_peak_gib": ours["peak_gib"],
               "ours_first_call_s": ours["first_call_s"]}
    summary["met"] = summary["ratio"] >= 2.0 and summary["step_cos"] >= 0.99  # issue 17's GPU line
    out.write_text(json.dumps({"rows": runner.rows, "summary": summary}, indent=1))
    print(runner.table(PEER))
    print("control summary:", json.dumps(summary), flush=True)
    return summary
