"""End-to-end image timing at real shapes: text encoders + N Euler/CFG steps + VAE decode.

Peer: the diffusers-module eager path (transformers CLIP-L/CLIP-G/T5-XXL, diffusers
SD3Transformer2DModel and AutoencoderKL, all bf16 eager). Ours: the same text encoders as the torch-fp8
backend runs them (T5-XXL with FP8 GEMMs calibrated on random ids, CLIPs and T5 compiled), the FP8
MMDiT (fast accumulation, sigmoid-form GELU, the backend's attention and GEMM choices: FA4 and quack
on the H200; compiled as its `compile=mode`, CUDA graphs by default) and the VAE decoder compiled. Both run our own loop
(`runtime.sampling.run` with `runtime.guidance.guided`) on the same random weights, prompt ids, noise and schedule.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from sd35trt.bench import EXCLUDE, Runner, diffusers_peer, free, random_init, random_mmdit
from sd35trt.runtime.config import VARIANTS, VariantConfig
from sd35trt.runtime.guidance import guided
from sd35trt.runtime.sampling import run
from sd35trt.runtime.schedule import flow_match_schedule

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
              vocab_size=32128, is_encoder_decoder=False, use_cache=False)


def text_encoders(dims: tuple[dict, dict, dict] = (CLIP_L, CLIP_G, T5_XXL),
                  device: str = "cuda") -> dict[str, torch.nn.Module]:
    """CLIP-L, CLIP-G and T5-XXL (transformers, bf16) with seeded random weights; `dims`: their
    configs (the released ones by default; sd35trt/bench_text.py's tiny ones for CPU checks)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        mods = {"clip_l": CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **dims[0])),
                "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **dims[1])),
                "t5": T5EncoderModel(T5Config(**dims[2]))}
    out = {k: random_init(m, device, i) for i, (k, m) in enumerate(mods.items())}
    for m in out.values():  # position ids are buffers the random fill must not touch
        for mod in m.modules():
            if hasattr(mod, "position_ids"):
                mod.position_ids = torch.arange(mod.position_ids.shape[-1], device=device)[None]
    return out


class _Pretokenized:
    """The bench's prompts are token ids already (random, seeded): hands PromptEncoder those ids,
    refusing a length other than theirs (so the runtime's assembly sees what the pipeline sends)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids  # [2, L]: [negative; positive]

    def __call__(self, texts: list[str], max_length: int) -> torch.Tensor:
        if len(texts) != self.ids.shape[0] or max_length != self.ids.shape[1]:
            raise ValueError(f"bench prompt ids are {tuple(self.ids.shape)}, asked for {len(texts)} x {max_length}")
        return self.ids


def prompt_encoder(config: VariantConfig, enc: dict, ids: dict[str, torch.Tensor]) -> Callable[[], tuple]:
    """runtime.text.PromptEncoder over these encoders and ids: () -> (context [2, 77+T, joint_dim],
    pooled [2, 2048]) for [negative; positive], assembled exactly as the pipeline does."""
    from sd35trt.runtime.backends.torch_backend import TorchBackend
    from sd35trt.runtime.models.loader import ClipGraph, T5Graph
    from sd35trt.runtime.text import PromptEncoder

    tokenizers = tuple(_Pretokenized(ids[k]) for k in ("clip_l", "clip_g", "t5"))
    graphs = {"clip_l": ClipGraph(enc["clip_l"]), "clip_g": ClipGraph(enc["clip_g"]), "t5": T5Graph(enc["t5"])}
    backend = TorchBackend.from_modules(graphs, ids["clip_l"].device, next(enc["clip_l"].parameters()).dtype)
    encoder = PromptEncoder(config, tokenizers, backend)
    t5_len = ids["t5"].shape[1]
    return lambda: encoder(["", ""], ["", ""], ["", ""], t5_len)


def run_e2e(config: VariantConfig, encode, transformer, vae, noise, steps: int) -> torch.Tensor:
    """Text encoders, `steps` Euler/CFG steps with the variant's shift and guidance, VAE decode."""
    ctx, pooled = encode()
    schedule = flow_match_schedule(steps, config.sampling.shift)
    predict = guided(transformer, ctx, pooled, config.sampling.guidance, steps=len(schedule))
    x = run(predict, noise, schedule, progress=False)
    return vae(x / config.vae.scaling_factor + config.vae.shift_factor)  # [1, 3, H, W]


def t5_as_the_backend_runs_it(enc: dict, config: VariantConfig, g: torch.Generator, pairs: int = 8) -> str:
    """T5-XXL with FP8 GEMMs calibrated over `pairs` random id pairs (the statistic export and the
    engine-set build store), then the CLIPs and T5 compiled: what TorchFP8Backend runs with
    `compile` set. In place; returns what T5 became (models.fp8_text.t5_precision)."""
    from sd35trt.runtime.models.fp8_text import calibrate_linears, compile_text_encoders, t5_precision

    calib = [torch.randint(0, 30000, (2, config.max_sequence_length), generator=g, device="cuda") for _ in range(pairs)]
    amax = calibrate_linears(enc["t5"], calib, lambda ids: enc["t5"](ids))
    precision = t5_precision(enc["t5"], amax)
    compile_text_encoders(enc)
    return precision


def prompt_ids(config: VariantConfig, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Token ids of [negative; positive]: CLIP-L/G `clip_tokens`, T5 `max_sequence_length`, from `g`."""
    lengths = {"clip_l": config.clip_tokens, "clip_g": config.clip_tokens, "t5": config.max_sequence_length}
    return {k: torch.randint(0, 30000, (2, n), generator=g, device="cuda") for k, n in lengths.items()}


def bench_e2e(variant: str, size: int, steps: int, runner: Runner, mode: str = "reduce-overhead") -> None:
    from diffusers import AutoencoderKL

    from sd35trt.runtime.backends.torch_fp8 import compile_options
    from sd35trt.runtime.models.flash_attention import choose_attention, set_attention_core
    from sd35trt.runtime.models.fp8 import max_calibrate, to_fp8
    from sd35trt.runtime.models.fp8_gemm import choose_gemm, use_quack
    from sd35trt.runtime.models.mmdit import use_sigmoid_gelu
    from sd35trt.runtime.models.vae import VaeDecoder

    config = VARIANTS[variant]
    g = torch.Generator(device="cuda").manual_seed(9)
    ids = prompt_ids(config, g)
    noise = torch.randn(config.latent_shape(1, size, size), generator=g, device="cuda")  # [1, 16, S/8, S/8]
    enc, model = text_encoders(), random_mmdit(config, torch.bfloat16, "cuda")
    encode = prompt_encoder(config, enc, ids)
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
                            lambda: run_e2e(config, encode, tf(peer), lambda z: peer_vae.decode(z.bfloat16()).sample,
                                            noise, steps), warmup=1, iters=3)
        del peer, peer_vae
        free()
        ctx, pooled = encode()
        x = torch.randn(2, *noise.shape[1:], device="cuda", dtype=torch.bfloat16)  # [2, 16, S/8, S/8]
        args = (x, torch.full((2,), 700.0, device="cuda"), ctx.bfloat16(), pooled.bfloat16())
        m8 = to_fp8(model, max_calibrate(model, lambda m: m(*args), EXCLUDE), fast_accum=True)
        use_sigmoid_gelu(m8)
        attention = choose_attention("cuda", torch.bfloat16)  # the torch-fp8 backend's choices
        set_attention_core(m8, attention.core)
        gemm = choose_gemm("cuda")
        use_quack(m8, gemm.name == "quack")
        m8 = torch.compile(m8, fullgraph=True, options=compile_options(mode))
        t5 = t5_as_the_backend_runs_it(enc, config, g)
        vae = torch.compile(ours_vae.to(memory_format=torch.channels_last))
        free()

        def transformer(*a: torch.Tensor) -> torch.Tensor:  # the attention context for the MMDiT only
            with attention.context():
                return m8(*(t.bfloat16() if t.dim() > 1 else t for t in a)).float()

        t0 = time.perf_counter()
        runner.record(f"e2e {steps}-step image, ours fp8 compiled {mode} [{attention.name}, {gemm.name}, T5 {t5}]",
                      lambda: run_e2e(config, encode, transformer, lambda z: vae(z.bfloat16()), noise, steps), ref,
                      warmup=1, iters=3)
        print(f"ours first call incl. compile: {time.perf_counter() - t0:.0f}s")
