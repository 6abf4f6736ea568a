"""LoRA on the FP8 MMDiT at real SD3.5 Large shapes (random weights): cost and fidelity.

  python tools/lora_bench.py OUT.json [--blocks N]

Fidelity, full depth (38 blocks), eager: one CFG step at 1024² (batch 1 -> 2 rows) of the FP8
MMDiT with a random LoRA on every attention and FF Linear (q/k/v/out, add_q/k/v/add_out, ff,
ff_context) through the side path, and fused (fuse=True: W + BA re-quantized to E4M3), each vs
the BF16 MMDiT with the same LoRA (side path in bf16). Cost: the same step compiled as the runtime's
torch-fp8 compile="reduce-overhead" (fast accumulation, sigmoid GELU, CUDA graphs), on the first
`--blocks` blocks (default 6; real widths and token counts; a cold compile of all 38 takes ~2 min
per row): no LoRA, side path rank 16 and rank 64 (one slot each), the default capacity (2 slots x
rank 64, one LoRA), and fused.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from sd35trt.bench import cosine, random_mmdit, step_inputs, time_cuda
from sd35trt.runtime.backends.torch_fp8 import compile_options
from sd35trt.runtime.config import VARIANTS
from sd35trt.runtime.lora import attach, fuse_lora
from sd35trt.runtime.lora_files import LoraFile, LoraPart
from sd35trt.runtime.models.fp8 import HIGH_PRECISION, max_calibrate, to_fp8
from sd35trt.runtime.models.lora_linear import LoraBank, uninstall
from sd35trt.runtime.models.mmdit import use_sigmoid_gelu

TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2")


DEVICE = "cuda"


def random_lora(model: torch.nn.Module, rank: int, seed: int) -> LoraFile:
    """A LoRA on every attention/FF Linear: A ~ N(0, 0.02), B sized so that |BA| ~ 0.3 |W|."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    parts = {}
    for i, block in enumerate(model.transformer_blocks):
        for t in TARGETS:
            try:
                lin = block.get_submodule(t)
            except AttributeError:  # the last block has no context output / ff_context
                continue
            a = torch.randn(rank, lin.in_features, generator=g, device=DEVICE) * 0.02
            b = torch.randn(lin.out_features, rank, generator=g, device=DEVICE) * (0.3 / rank ** 0.5)
            parts[f"transformer_blocks.{i}.{t}"] = LoraPart(a, b)
    return LoraFile(Path(f"random-rank{rank}"), "", {"transformer": parts})


def banks(slots: int, rank: int, dtype=torch.bfloat16):
    bank = LoraBank(slots, rank, torch.device(DEVICE), dtype)
    bank.set_rows(torch.ones(2, slots))  # the CFG rows at strength 1 (slot 0; others zero)
    bank.strengths[:, 1:].zero_()
    return bank, (lambda comp, model: bank)


@torch.inference_mode()
def fidelity(config, size: int = 1024) -> dict:
    model = random_mmdit(config, torch.bfloat16, DEVICE)
    args = step_inputs(config, size, 1, DEVICE, torch.bfloat16)
    plain_ref = model(*args).float()
    amax = max_calibrate(model, lambda m: m(*args), HIGH_PRECISION)  # calibrated without the LoRA
    lora = random_lora(model, 64, seed=3)
    _, bank_for = banks(1, 64)
    attach({"transformer": model}, lora, 0, bank_for)
    ref = model(*args).float()  # bf16 with the LoRA (side path in bf16)
    uninstall(model)
    m8 = to_fp8(model, amax, fast_accum=True)
    use_sigmoid_gelu(m8)
    plain8 = m8(*args).float()
    _, bank_for = banks(1, 64)
    attach({"transformer": m8}, lora, 0, bank_for)
    side = m8(*args).float()
    uninstall(m8)
    fuse_lora({"transformer": m8}, lora, 1.0)
    fused = m8(*args).float()
    out = {"side_cos_vs_bf16_lora": cosine(side, ref), "fused_cos_vs_bf16_lora": cosine(fused, ref),
           "fused_cos_vs_side": cosine(fused, side), "fp8_no_lora_cos_vs_bf16": cosine(plain8, plain_ref),
           "bf16_lora_vs_no_lora_cos": cosine(ref, plain_ref)}
    del model, m8
    torch.cuda.empty_cache()
    return out


def timed(m8, args, label: str, rows: list) -> None:
    torch._dynamo.reset()
    fn = torch.compile(m8, fullgraph=True, options=compile_options("reduce-overhead"))
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn(*args)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ms = time_cuda(lambda: fn(*args), warmup=3, iters=20)
    rows.append({"name": label, "step_ms": round(ms, 3), "first_call_s": round(first, 1)})
    print(rows[-1], flush=True)


def cost(config, blocks: int) -> list[dict]:
    cfg = replace(config, transformer=replace(config.transformer, num_layers=blocks))
    with torch.inference_mode():
        model = random_mmdit(cfg, torch.bfloat16, "cuda")
        args = step_inputs(cfg, 1024, 1, "cuda", torch.bfloat16)
        amax = max_calibrate(model, lambda m: m(*args), HIGH_PRECISION)
        loras = {r: random_lora(model, r, seed=r) for r in (16, 64)}
        m8 = to_fp8(model, amax, fast_accum=True)
        use_sigmoid_gelu(m8)
    rows: list[dict] = []
    timed(m8, args, "fp8, no LoRA", rows)
    for label, (slots, rank, lora) in {"side path rank 16 (1 slot x 16)": (1, 16, 16),
                                       "side path rank 64 (1 slot x 64)": (1, 64, 64),
                                       "side path rank 64, default capacity (2 slots x 64)": (2, 64, 64)}.items():
        _, bank_for = banks(slots, rank)
        with torch.inference_mode():
            attach({"transformer": m8}, loras[lora], 0, bank_for)
        timed(m8, args, label, rows)
        uninstall(m8)
    with torch.inference_mode():
        fuse_lora({"transformer": m8}, loras[64], 1.0)
    timed(m8, args, "fused rank 64 (fuse=True)", rows)
    base = rows[0]["step_ms"]
    for r in rows:
        r["vs_no_lora"] = round(r["step_ms"] / base, 4)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--blocks", type=int, default=6)
    a = ap.parse_args()
    config = VARIANTS["sd3.5-large"]
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "size": 1024, "batch": 1,
           "blocks_timed": a.blocks, "fidelity_full_depth": fidelity(config)}
    print(doc["fidelity_full_depth"], flush=True)
    doc["cost"] = cost(config, a.blocks)
    Path(a.out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
