"""`sd35trt bench --configs e2e --memory default,low`: peak GPU memory and time of whole images per memory mode.

Random weights at real shapes (seeded), the torch-fp8 backend's models (FP8 MMDiT from a max
calibration, T5-XXL weight-only FP8, VAE channels-last; eager), run through the runtime's own
`Pipeline` with `runtime.memory.apply_memory`: text encoders through VAE decode, CFG. Prompts are
random token ids (no tokenizer at real size here); a "repeated" prompt is the warm-up's text again
(a prompt-cache hit in balanced / low), a "new" one a text not seen before (the encoders run).
Peak = torch's max allocated bytes over the image (reset before it); modes run in the order given,
on the same weights, so their ratios come from one run.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from sd35trt.bench import EXCLUDE, free, random_init, random_mmdit, step_inputs
from sd35trt.bench_e2e import _Pretokenized, prompt_ids, text_encoders
from sd35trt.runtime.config import VARIANTS, VariantConfig

GIB = 2**30


def torch_fp8_backend(config: VariantConfig, size: int, t5: bool):
    """The torch-fp8 backend over random full-size modules on the GPU (no checkpoint at real size here)."""
    from sd35trt.runtime.backends.torch_backend import TorchBackend
    from sd35trt.runtime.models.fp8 import fp8_weights_only, max_calibrate, to_fp8
    from sd35trt.runtime.models.loader import ClipGraph, T5Graph
    from sd35trt.runtime.models.mmdit import use_sigmoid_gelu
    from sd35trt.runtime.models.vae import VaeDecoder

    enc = text_encoders()
    model = random_mmdit(config, torch.bfloat16, "cuda")
    args = step_inputs(config, size, 1, "cuda", torch.bfloat16)
    with torch.no_grad():
        mmdit = to_fp8(model, max_calibrate(model, lambda m: m(*args), EXCLUDE))
    use_sigmoid_gelu(mmdit)
    with torch.device("meta"):
        vae = VaeDecoder(config.vae)
    vae = random_init(vae, "cuda", 7).to(memory_format=torch.channels_last)
    modules = {"clip_l": ClipGraph(enc["clip_l"]), "clip_g": ClipGraph(enc["clip_g"]), "transformer": mmdit,
               "vae_decoder": vae}
    if t5:
        modules["t5"] = T5Graph(fp8_weights_only(enc["t5"]))
    del enc, model
    free()
    return TorchBackend.from_modules(modules, torch.device("cuda"), torch.bfloat16)


def _image(pipe, prompt: str, size: int, steps: int) -> tuple[float, int, int]:
    """(seconds, peak allocated bytes, peak reserved bytes) of one whole image."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe(prompt, height=size, width=size, num_inference_steps=steps, output_type="np", progress=False,
         generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def bench_memory(preset: str, size: int, steps: int, modes: list[str], t5: bool = True, repeats: int = 2,
                 out: Path | None = None) -> list[dict]:
    """One row per mode: peak allocated GiB over whole images, seconds per image on a repeated and a
    new prompt (medians of `repeats`), ratios to the first mode's."""
    from sd35trt.runtime.memory import MODES, MemoryBackend, MemorySettings, apply_memory
    from sd35trt.runtime.pipeline import Pipeline

    if modes != sorted(modes, key=MODES.index) or len(set(modes)) < len(modes):
        raise ValueError(f"--memory {','.join(modes)}: give each mode once, in the order {','.join(MODES)} "
                         f"(a later mode starts from the host copies an earlier one made)")
    config = VARIANTS[preset]
    backend = torch_fp8_backend(config, size, t5)
    ids = prompt_ids(config, torch.Generator(device="cuda").manual_seed(9))
    tokenizers = tuple(_Pretokenized(ids[k]) for k in ("clip_l", "clip_g", "t5"))
    rows, previous, fresh = [], None, iter(range(10**6))
    for mode in modes:
        if isinstance(previous, MemoryBackend):  # the last mode's device copies go; its host masters are reused
            for h in previous.residency.handles.values():
                h.unload()
        pipe = apply_memory(Pipeline(config, backend, tokenizers, Path(f"random-{preset}")), MemorySettings.check(mode))
        previous = pipe.backend
        free()
        warm = _image(pipe, "warm-up prompt", size, steps)
        rep = [_image(pipe, "warm-up prompt", size, steps) for _ in range(repeats)]
        new = [_image(pipe, f"new prompt {next(fresh)}", size, steps) for _ in range(repeats)]
        every = [warm] + rep + new
        row = {"preset": preset, "t5": t5, "size": size, "steps": steps, "memory": mode,
               "peak_gib": round(max(r[1] for r in every) / GIB, 3),
               "peak_reserved_gib": round(max(r[2] for r in every) / GIB, 3),
               "first_s": round(warm[0], 3), "repeated_s": round(statistics.median(r[0] for r in rep), 3),
               "new_s": round(statistics.median(r[0] for r in new), 3)}
        if rows:
            row["repeated_vs_first_mode"] = round(row["repeated_s"] / rows[0]["repeated_s"], 3)
            row["new_vs_first_mode"] = round(row["new_s"] / rows[0]["new_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out is not None:
            out.write_text(json.dumps(rows, indent=1))
    return rows
