"""End-to-end image timing at real shapes: text encoders + N Euler/CFG steps + VAE decode.

Peer: the diffusers-module eager path (transformers CLIP-L/CLIP-G/T5-XXL, diffusers
SD3Transformer2DModel and AutoencoderKL, all bf16 eager). Ours: the same text encoders with T5's
Linears weight-only FP8, the FP8 MMDiT (fast accumulation, sigmoid-form GELU, compiled as the
torch-fp8 backend's `compile=mode`, CUDA graphs by default) and the VAE decoder compiled. Both run our own loop
(`runtime.sampling.denoise`) on the same random weights, prompt ids, noise and schedule.
"""

from __future__ import annotations

import time

import torch

from sd35trt.bench import EXCLUDE, Runner, diffusers_peer, free, random_init, random_mmdit
from sd35trt.runtime.config import VARIANTS
from sd35trt.runtime.sampling import denoise
from sd35trt.runtime.schedule import flow_match_schedule

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
              vocab_size=32128, is_encoder_decoder=False, use_cache=False)


def text_encoders() -> dict[str, torch.nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        mods = {"clip_l": CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_L)),
                "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_G)),
                "t5": T5EncoderModel(T5Config(**T5_XXL))}
    out = {k: random_init(m, "cuda", i) for i, (k, m) in enumerate(mods.items())}
    for m in out.values():  # position ids are buffers the random fill must not touch
        for mod in m.modules():
            if hasattr(mod, "position_ids"):
                mod.position_ids = torch.arange(mod.position_ids.shape[-1], device="cuda")[None]
    return out


def encode(enc: dict, ids: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 conditioning for [neg; pos]: context [2, 333, 4096], pooled [2, 2048]."""
    lo, go = (enc[k](ids[k], output_hidden_states=True) for k in ("clip_l", "clip_g"))
    clip = torch.cat([lo.hidden_states[-2], go.hidden_states[-2]], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, 4096 - clip.shape[-1]))
    ctx = torch.cat([clip, enc["t5"](ids["t5"])[0]], dim=1)
    return ctx, torch.cat([lo.text_embeds, go.text_embeds], dim=-1)


def run_e2e(enc, transformer, vae, ids, noise, steps: int) -> torch.Tensor:
    ctx, pooled = encode(enc, ids)
    schedule = flow_match_schedule(steps, 3.0)
    x = denoise(transformer, noise, ctx, pooled, schedule, 3.5, progress=False)
    return vae(x / 1.5305 + 0.0609)


def prompt_ids(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Token ids of [negative; positive]: CLIP-L/G 77 tokens, T5 256, from `g`."""
    return {k: torch.randint(0, 30000, (2, 77 if k != "t5" else 256), generator=g, device="cuda")
            for k in ("clip_l", "clip_g", "t5")}


def bench_text(runner: Runner) -> None:
    """The three text encoders for one CFG prompt pair: transformers BF16 eager (peer) vs ours
    (T5-XXL's Linears weight-only FP8, as the torch-fp8 end-to-end path runs them)."""
    from sd35trt.runtime.models.fp8 import fp8_weights_only

    enc, ids = text_encoders(), prompt_ids(torch.Generator(device="cuda").manual_seed(9))
    with torch.no_grad():
        ref = runner.record("text encoders (CLIP-L, CLIP-G, T5-XXL) transformers eager bf16",
                            lambda: encode(enc, ids)[0])
        fp8_weights_only(enc["t5"])
        free()
        runner.record("text encoders, ours (T5-XXL weight-only FP8)", lambda: encode(enc, ids)[0], ref)


def bench_e2e(variant: str, size: int, steps: int, runner: Runner, mode: str = "reduce-overhead") -> None:
    from diffusers import AutoencoderKL

    from sd35trt.runtime.backends.torch_fp8 import compile_options
    from sd35trt.runtime.models.fp8 import fp8_weights_only, max_calibrate, to_fp8
    from sd35trt.runtime.models.mmdit import use_sigmoid_gelu
    from sd35trt.runtime.models.vae import VaeDecoder

    config = VARIANTS[variant]
    g = torch.Generator(device="cuda").manual_seed(9)
    ids = prompt_ids(g)
    noise = torch.randn(config.latent_shape(1, size, size), generator=g, device="cuda")
    enc, model = text_encoders(), random_mmdit(config, torch.bfloat16, "cuda")
    with torch.device("meta"):
        ours_vae = VaeDecoder(config.vae)
    ours_vae = random_init(ours_vae, "cuda", 7)
    n = len(config.vae.block_out_channels)
    peer_vae = AutoencoderKL(latent_channels=16, block_out_channels=config.vae.block_out_channels,
                             layers_per_block=config.vae.layers_per_block, norm_num_groups=config.vae.norm_num_groups,
                             down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                             use_quant_conv=False, use_post_quant_conv=False).to("cuda", torch.bfloat16).eval()
    peer_vae.decoder.load_state_dict(ours_vae.decoder.state_dict())
    peer = diffusers_peer(model, config)
    tf = lambda m: (lambda *a: m(hidden_states=a[0].bfloat16(), timestep=a[1], encoder_hidden_states=a[2].bfloat16(),  # noqa: E731
                                 pooled_projections=a[3].bfloat16(), return_dict=False)[0].float())
    with torch.no_grad():
        ref = runner.record(f"e2e {steps}-step image, diffusers modules eager bf16",
                            lambda: run_e2e(enc, tf(peer), lambda z: peer_vae.decode(z.bfloat16()).sample, ids, noise, steps),
                            warmup=1, iters=3)
        del peer, peer_vae
        free()
        x = torch.randn(2, *noise.shape[1:], device="cuda", dtype=torch.bfloat16)
        args = (x, torch.full((2,), 700.0, device="cuda"), encode(enc, ids)[0], encode(enc, ids)[1])
        m8 = to_fp8(model, max_calibrate(model, lambda m: m(*args), EXCLUDE), fast_accum=True)
        use_sigmoid_gelu(m8)
        m8 = torch.compile(m8, fullgraph=True, options=compile_options(mode))
        fp8_weights_only(enc["t5"])
        vae = torch.compile(ours_vae.to(memory_format=torch.channels_last))
        free()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def transformer(*a: torch.Tensor) -> torch.Tensor:  # cuDNN attention for the MMDiT only (T5 has a bias)
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
                return m8(*(t.bfloat16() if t.dim() > 1 else t for t in a)).float()

        t0 = time.perf_counter()
        runner.record(f"e2e {steps}-step image, ours fp8 compiled {mode}",
                      lambda: run_e2e(enc, transformer, lambda z: vae(z.bfloat16()), ids, noise, steps), ref,
                      warmup=1, iters=3)
        print(f"ours first call incl. compile: {time.perf_counter() - t0:.0f}s")
