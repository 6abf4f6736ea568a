"""`sd35trt bench`: the peer (diffusers eager / compiled BF16) and our backends, one process, one run.

Random weights at real shapes (the released variants' configs), seeded; per-step medians over
CUDA events after warm-up, peak GPU memory, fidelity of FP8 against BF16. Writes JSON and prints a
table with ratios to the eager peer. Runs on a GPU host without a package index (carry diffusers).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from sd35trt.runtime.backends.fp8_fusions import FUSIONS
from sd35trt.runtime.config import VARIANTS, VariantConfig
from sd35trt.runtime.models.fp8 import HIGH_PRECISION as EXCLUDE
from sd35trt.runtime.models.mmdit import MMDiT



def random_init(module: torch.nn.Module, device: str, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Materialise a meta-device module on `device` with seeded N(0, 0.02) floats (no fp32 copy)."""
    module = module.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.normal_(0.0, 0.02, generator=g)
    return module.eval().requires_grad_(False)


def random_mmdit(config: VariantConfig, dtype: torch.dtype, device: str, seed: int = 0) -> MMDiT:
    """A full-size MMDiT of `config` with random weights (pos_embed too)."""
    with torch.device("meta"):
        model = MMDiT(config.transformer)
    return random_init(model, device, seed, dtype)


def step_inputs(config: VariantConfig, size: int, batch: int, device: str, dtype: torch.dtype, seed: int = 1):
    """One CFG transformer step: latents [2B, 16, S/8, S/8], t [2B], ctx [2B, 333, 4096], pooled [2B, 2048]."""
    g = torch.Generator(device=device).manual_seed(seed)
    b = 2 * batch
    lat = torch.randn(config.latent_shape(b, size, size), generator=g, device=device, dtype=dtype)
    ctx = torch.randn(b, config.text_tokens(), config.joint_dim, generator=g, device=device, dtype=dtype)
    pooled = torch.randn(b, config.pooled_dim, generator=g, device=device, dtype=dtype)
    return lat, torch.full((b,), 700.0, device=device), ctx, pooled


def sync() -> None:
    """Wait for the GPU (nothing to wait for on a CPU-only machine: the benches' CPU checks)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_cuda(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of `fn` over `iters` runs, CUDA events (wall clock without CUDA), after `warmup` runs."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_calls(fn, iters))


def timed_calls(fn: Callable[[], object], iters: int) -> list[float]:
    """Milliseconds of each of `iters` calls of `fn`: CUDA events (wall clock without CUDA)."""
    if not torch.cuda.is_available():
        return [_wall_ms(fn) for _ in range(iters)]
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def graph_ms(fn: Callable[[], object], calls: int = 10, replays: int = 5) -> float:
    """Milliseconds per call of `fn` (CUDA): `calls` calls captured in one CUDA graph after one
    eager call, the median over `replays` replays (kernel probes: no launch gaps in the figure)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    return statistics.median(t / calls for t in timed_calls(g.replay, replays))


def _wall_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def fidelity(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """cosine and relative L2 vs the BF16 reference; PSNR (dB) too when the tensors are images in [-1, 1]."""
    a, b = y.flatten().double(), ref.flatten().double()
    out = {"cos_vs_bf16": round(cosine(a, b), 5), "rel_l2": round(float((a - b).norm() / b.norm()), 5)}
    if y.dim() == 4 and y.shape[1] == 3:
        mse = float((((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).mean())
        out["psnr_db"] = round(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-20))).item(), 2)
    return out


def attention_ctx(kind: str):
    if kind == "default":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[kind])


def diffusers_peer(model: MMDiT, config: VariantConfig):
    """diffusers' SD3Transformer2DModel holding the same weights (our names are diffusers')."""
    from diffusers import SD3Transformer2DModel

    cfg = {k: v for k, v in config.transformer.to_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        peer = SD3Transformer2DModel(**cfg)
    peer.load_state_dict(model.state_dict(), strict=True, assign=True)
    return peer.eval().requires_grad_(False)


class Runner:
    """Times named configurations and keeps the rows; prints ratios to the eager peer."""

    def __init__(self, out: Path) -> None:
        self.rows: list[dict] = []
        self.out = out

    def record(self, name: str, fn: Callable[[], torch.Tensor], ref: torch.Tensor | None = None,
               warmup: int = 3, iters: int = 10, **extra) -> torch.Tensor:
        sync()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        y = fn()
        sync()
        first = time.perf_counter() - t0
        fid = fidelity(y, ref) if ref is not None else {}  # before CUDA-graph replays reuse y
        y = y.clone()
        ms = time_cuda(fn, warmup, iters)
        row = {"name": name, "step_ms": round(ms, 2), "first_call_s": round(first, 1),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, 2), **fid, **extra}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.out.write_text(json.dumps(self.rows, indent=1))
        return y

    def table(self, peer: str) -> str:
        base = next((r["step_ms"] for r in self.rows if r["name"] == peer), None)
        lines = [f"{'config':<34} {'step ms':>8} {'vs peer':>8} {'peak GiB':>9} {'1st call s':>10} {'cos':>8}"]
        for r in self.rows:
            ratio = f"{base / r['step_ms']:.2f}x" if base else "-"
            lines.append(f"{r['name']:<34} {r['step_ms']:>8.1f} {ratio:>8} {r['peak_gib']:>9.2f} "
                         f"{r['first_call_s']:>10.1f} {r.get('cos_vs_bf16', ''):>8}")
        return "\n".join(lines)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def bench_attention(config: VariantConfig, size: int, batch: int, runner: Runner) -> None:
    """The joint attention of one block at this shape, per core: SDPA backends (heads-first views of
    [B, N, H, D] tensors, as the MMDiT calls them) and FA4 when it imports (x num_layers = per step)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sd35trt.runtime.models.flash_attention import choose_attention, flash_attention
    from sd35trt.runtime.models.mmdit import sdpa

    spec = config.transformer
    n = config.image_tokens(size, size) + config.text_tokens()
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2 * batch, n, spec.num_attention_heads, spec.attention_head_dim, generator=g,
                           device="cuda", dtype=torch.bfloat16) for _ in range(3))  # [B, N, H, D]
    with sdpa_kernel(SDPBackend.MATH):
        ref = sdpa(q.float(), k.float(), v.float())  # fp32 math reference
    cores = [(f"sdpa {name}", lambda: sdpa(q, k, v), backend) for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION))]
    choice = choose_attention("cuda", torch.bfloat16)
    if choice.core is flash_attention:
        cores.append(("flash-attn-4 (custom op)", lambda: flash_attention(q, k, v), None))
    else:
        print(f"flash-attn-4: not run ({choice.reason})")
    flops = 4 * q.shape[0] * spec.num_attention_heads * n * n * spec.attention_head_dim
    for name, fn, backend in cores:
        try:
            with sdpa_kernel(backend) if backend is not None else nullcontext():
                runner.record(f"{name} x{spec.num_layers} layers", fn, ref, per_layer=True)
        except RuntimeError as exc:  # backend not available for this shape/GPU
            print(f"{name}: unavailable ({str(exc).splitlines()[0]})")
            continue
        row = runner.rows[-1]
        row["layer_ms"], row["tflops"] = row["step_ms"], round(flops / row["step_ms"] / 1e9, 1)
        row["step_ms"] = round(row["step_ms"] * spec.num_layers, 2)
        runner.out.write_text(json.dumps(runner.rows, indent=1))


FP8_FLAGS = {"fast": "fast-accumulation FP8 GEMMs", "fa4": "FlashAttention-4 attention core (custom op)",
             "quack": "quack CuTe-DSL FP8 GEMMs, FF1 fused with GELU + FF2's quantization (models/fp8_gemm.py)",
             "tune": "inductor coordinate-descent tuning of its Triton kernels",
             "gelu": "GELU(tanh) as x*sigmoid(2z)", "mk": "inductor multi-kernel (persistent LayerNorm rows)",
             **{k: v for k, v in FUSIONS.items() if k != "tune"}}  # runtime/backends/fp8_fusions.py (`tune` above)


def fp8_config(cfg: str) -> tuple[str | None, set[str]]:
    """"fp8" / "fp8-compile-<mode>", then "+flag"s -> (compile mode or None for eager, flags)."""
    base, *flags = cfg.split("+")
    unknown = set(flags) - set(FP8_FLAGS)
    if unknown or not (base == "fp8" or base.startswith("fp8-compile-")):
        raise ValueError(f"bench config {cfg!r}: expected fp8[-compile-<mode>][+flag...] with flags from "
                         f"{sorted(FP8_FLAGS)}")
    return (None if base == "fp8" else base.removeprefix("fp8-compile-")), set(flags)


def inductor_options(mode: str, tune: bool = False, multi_kernel: bool = False) -> dict:
    """torch.compile's `mode` as inductor options (compile takes one or the other), plus tuning."""
    from torch._inductor import list_mode_options

    return {**list_mode_options(mode), **({"coordinate_descent_tuning": True} if tune else {}),
            **({"triton.multi_kernel": 1} if multi_kernel else {})}


def set_fp8_options(model: torch.nn.Module, flags: set[str]) -> None:
    """Apply a config's flags to an FP8 model in place (GEMM accumulation, attention core, GELU).
    `fa4` where FA4 does not run here raises, naming why (a bench row must be what it says)."""
    from sd35trt.runtime.models.flash_attention import (choose_attention, flash_attention,
                                                        set_attention_core)
    from sd35trt.runtime.models.fp8_gemm import choose_gemm, use_quack
    from sd35trt.runtime.models.mmdit import sdpa, use_sigmoid_gelu

    for mod in model.modules():
        if hasattr(mod, "fast_accum"):
            mod.fast_accum = "fast" in flags
    core = sdpa
    if "fa4" in flags:
        device = next(iter(model.buffers())).device
        choice = choose_attention(device, torch.bfloat16)
        if choice.core is not flash_attention:
            raise RuntimeError(f"bench flag +fa4: FlashAttention-4 does not run here ({choice.reason})")
        core = choice.core
    set_attention_core(model, core)
    use_sigmoid_gelu(model, "gelu" in flags)
    if "quack" in flags:
        choose_gemm(next(iter(model.buffers())).device, "quack")  # raises where quack cannot run, naming why
    use_quack(model, "quack" in flags)
    from sd35trt.runtime.backends.fp8_fusions import apply_fusions, uninstall_persistent_rows
    from sd35trt.runtime.models.adaln_bank import unbatch_adaln

    unbatch_adaln(model)  # the previous row's fusions off, this row's on (their inductor options: fused_options)
    uninstall_persistent_rows()
    apply_fusions(model, fused(flags))


def fused(flags: set[str]) -> tuple[str, ...]:
    """The config's flags that are runtime step fusions (fp8_fusions.py), `tune` left to inductor_options."""
    return tuple(f for f in FUSIONS if f in flags and f != "tune")


def bench_transformer(variant: str, size: int, batch: int, configs: list[str], attention: str,
                      out: Path, fidelity: bool = False) -> Runner:
    """Time `configs` on a random-weight model of `variant`; with `fidelity`, every FP8 row is also
    compared (cosine, relative L2) with a BF16 output of the same inputs, even when no peer or bf16
    row is timed (then an untimed eager BF16 forward is the reference)."""
    from sd35trt.runtime.backends.fp8_fusions import fusion_options
    from sd35trt.runtime.models.fp8 import max_calibrate, to_fp8

    fp8_rows = {c: fp8_config(c) for c in configs if c.startswith("fp8")}  # bad names fail before setup
    config, runner, bf16 = VARIANTS[variant], Runner(out), torch.bfloat16
    model = random_mmdit(config, bf16, "cuda")
    args = step_inputs(config, size, batch, "cuda", bf16)
    ref = None
    with torch.no_grad():
        if "attention" in configs:
            bench_attention(config, size, batch, runner)
        if "vae" in configs:
            bench_vae(config, size, runner)
        if {"peer-eager", "peer-compile", "peer-ao"} & set(configs):  # the peer keeps diffusers' own choices
            peer = diffusers_peer(model, config)  # shares the weight tensors: no extra memory

            def call(m):
                return m(hidden_states=args[0], timestep=args[1], encoder_hidden_states=args[2],
                         pooled_projections=args[3], return_dict=False)[0]

            ref = runner.record("diffusers eager bf16", lambda: call(peer))
            if "peer-compile" in configs:
                compiled = torch.compile(peer)
                runner.record("diffusers torch.compile bf16", lambda: call(compiled), ref)
                del compiled
            del peer
            free()
            torch._dynamo.reset()
    ao_peer = diffusers_peer(model, config) if "peer-ao" in configs else None  # keeps the bf16 weights alive
    with torch.no_grad(), attention_ctx(attention):
        if "bf16" in configs:
            y = runner.record(f"ours eager bf16 [{attention}]", lambda: model(*args), ref)
            ref = ref if ref is not None else y
        if fidelity and ref is None:
            ref = model(*args)  # our eager BF16 MMDiT == diffusers' (tests/runtime/models/test_mmdit.py)
        amax = max_calibrate(model, lambda m: m(*args), EXCLUDE)
        m8 = to_fp8(model, amax)
        free()
        for mode, flags in fp8_rows.values():
            set_fp8_options(m8, flags)
            torch._dynamo.reset()
            options = None if mode is None else {**inductor_options(mode, "tune" in flags, "mk" in flags),
                                                 **fusion_options(fused(flags))}
            fn = m8 if options is None else torch.compile(m8, fullgraph=True, options=options)
            name = f"ours {'eager' if mode is None else 'compile ' + mode} fp8{''.join(' +' + f for f in sorted(flags))}"
            runner.record(f"{name} [{'fa4' if 'fa4' in flags else attention}]", lambda: fn(*args), ref)
            if "profile" in configs and mode is not None:
                runner.rows[-1]["breakdown_ms"] = kernel_breakdown(lambda: fn(*args))
                print("breakdown", runner.rows[-1]["breakdown_ms"], flush=True)
            del fn
    if ao_peer is not None:  # last: its compile is the longest, and rows above are already written
        del m8, model
        free()
        with torch.no_grad():
            torchao_row(ao_peer, args, runner, ref)
    print(runner.table("diffusers eager bf16"))
    return runner


def torchao_row(peer, args, runner: Runner, ref: torch.Tensor | None) -> None:
    """diffusers' transformer with torchao float8 rowwise (dynamic activations, PerRow scales) and
    torch.compile: torchao's own recipe, including the inductor settings it sets (coordinate-descent
    tuning), which are restored afterwards."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    cfg = torch._inductor.config
    keys = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "force_fuse_int_mm_with_mul",
            "fx_graph_cache")
    saved = {k: getattr(cfg, k) for k in keys}
    saved_unique = cfg.triton.unique_kernel_names
    torch._dynamo.reset()
    try:
        quantize_(peer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        compiled = torch.compile(peer)
        runner.record("diffusers + torchao float8 rowwise, compile",
                      lambda: compiled(hidden_states=args[0], timestep=args[1], encoder_hidden_states=args[2],
                                       pooled_projections=args[3], return_dict=False)[0], ref)
    finally:
        for k, val in saved.items():
            setattr(cfg, k, val)
        cfg.triton.unique_kernel_names = saved_unique


def bench_vae(config: VariantConfig, size: int, runner: Runner) -> None:
    """VAE decode of one image: diffusers AutoencoderKL eager bf16 vs ours (channels-last, compiled)."""
    from diffusers import AutoencoderKL

    from sd35trt.runtime.models.vae import VaeDecoder

    spec = config.vae
    with torch.device("meta"):
        ours = VaeDecoder(spec)
    ours = random_init(ours, "cuda", 5)
    g = torch.Generator(device="cuda").manual_seed(5)
    n = len(spec.block_out_channels)
    peer = AutoencoderKL(latent_channels=16, block_out_channels=spec.block_out_channels,
                         layers_per_block=spec.layers_per_block, norm_num_groups=spec.norm_num_groups,
                         down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                         use_quant_conv=False, use_post_quant_conv=False).to("cuda", torch.bfloat16).eval()
    peer.decoder.load_state_dict(ours.decoder.state_dict())
    z = torch.randn(config.latent_shape(1, size, size), generator=g, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = runner.record("vae decode diffusers eager bf16", lambda: peer.decode(z).sample)
        runner.record("vae decode ours eager bf16", lambda: ours(z), ref)
        cl = ours.to(memory_format=torch.channels_last)
        compiled = torch.compile(cl)
        runner.record("vae decode ours compile bf16 ch-last", lambda: compiled(z.contiguous(memory_format=torch.channels_last)), ref)


def kernel_breakdown(fn: Callable[[], object], steps: int = 3) -> dict[str, float]:
    """Milliseconds per step of GPU kernels by kind (GEMM, attention, rest), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kinds = {"gemm": 0.0, "attention": 0.0, "rest": 0.0}
    top: dict[str, tuple[float, float]] = {}
    for ev in prof.key_averages():
        us = ev.self_device_time_total if hasattr(ev, "self_device_time_total") else ev.self_cuda_time_total
        if us <= 0:
            continue
        name = ev.key.lower()
        kind = ("attention" if any(k in name for k in ("fmha", "flash", "cudnn", "attention", "sdpa"))
                else "gemm" if any(k in name for k in ("gemm", "xmma", "nvjet", "cutlass", "scaled_mm", "matmul"))
                else "rest")
        kinds[kind] += us / 1000 / steps
        top[ev.key[:100]] = (us / 1000 / steps, ev.count / steps)
    kinds["kernels"] = sum(n for _, n in top.values())
    for k, (ms, n) in sorted(top.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"  {ms:8.2f} ms {n:6.0f}x  {k}")
    return {k: round(v, 2) for k, v in kinds.items()}
