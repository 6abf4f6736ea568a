"""FP8 calibration study on the CPU: final-latent cosine FP8 vs bf16 per calibration choice, at
SD3.5 Medium widths with few blocks (random weights, as `sd35trt bench --configs modes`).

    python tools/fp8_calib_study.py --blocks 4 --size 128 --steps 8 [--control]

Calibrations compared (all `max_calibrate`, ModelOpt's max statistic):
  one-step        one CFG call at t=700 on unit-Gaussian latents (the modes bench before issue 13's fix);
  runs            every call of two whole text-to-image runs of other requests (the bench now, and
                  what `sd35trt export` does over the calibration prompts);
  runs+i2i        the same plus an image-to-image run (are the modes' start points covered?);
  runs adaLN-bf16 `runs`, with the per-block adaLN Linears (norm1*, M = batch) kept in bf16.
FP8 is emulated (E4M3 round trip of inputs and weights with the same static per-tensor scales,
fp32 accumulation, bf16 out: `FP8Linear` without `_scaled_mm`, which is very slow on the CPU;
`--real` uses `to_fp8` itself). `--control` adds bf16 vs fp32 on the same weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch
from torch import nn

from sd35trt.bench import EXCLUDE, cosine, random_init, random_mmdit
from sd35trt.bench_modes import calibrate_on_runs, callables, make_inputs, mode_latents
from sd35trt.runtime.config import VARIANTS
from sd35trt.runtime.guidance import SkipLayerGuidance
from sd35trt.runtime.models.flash_attention import choose_attention
from sd35trt.runtime.models.fp8 import E4M3_MAX, fused_amax, max_calibrate, replace_module, to_e4m3, to_fp8
from sd35trt.runtime.models.vae import VaeEncoder


class EmulatedFP8Linear(nn.Module):
    """FP8Linear's arithmetic in plain torch: (x/s_x -> e4m3) * s_x @ ((W/s_w -> e4m3) * s_w)^T + b."""

    def __init__(self, linear: nn.Linear, in_amax: float, w_amax: float) -> None:
        super().__init__()
        self.s_x, s_w = max(in_amax, 1e-12) / E4M3_MAX, max(w_amax, 1e-12) / E4M3_MAX
        self.weight = nn.Parameter(to_e4m3(linear.weight.detach(), s_w).float() * s_w, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = to_e4m3(x, self.s_x).float() * self.s_x
        return nn.functional.linear(xq, self.weight, self.bias).to(torch.bfloat16)


def emulated_fp8(model: nn.Module, amax: dict[str, float]) -> nn.Module:
    """`to_fp8` (q/k/v fused, the same scales) with EmulatedFP8Linear in place of FP8Linear."""
    amax = fused_amax(amax)
    for mod in model.modules():
        if hasattr(mod, "fuse_qkv"):
            mod.fuse_qkv()
    for name, lin in [(n, m) for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and f"{n}.input_quantizer" in amax]:
        replace_module(model, name, EmulatedFP8Linear(lin, amax[f"{name}.input_quantizer"],
                                                      amax[f"{name}.weight_quantizer"]))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--strength", type=float, default=0.6)
    ap.add_argument("--modes", default="text-to-image,image-to-image")
    ap.add_argument("--control", action="store_true", help="bf16 vs fp32 on the same weights")
    ap.add_argument("--real", action="store_true", help="to_fp8 (torch._scaled_mm) instead of the emulation")
    a = ap.parse_args()
    base = VARIANTS["sd3.5-medium"]
    spec = dataclasses.replace(base.transformer, num_layers=a.blocks, dual_attention_layers=tuple(
        i for i in base.transformer.dual_attention_layers if i < a.blocks))
    config = dataclasses.replace(base, transformer=spec)
    model = random_mmdit(config, torch.bfloat16, "cpu")  # [Medium widths, a.blocks blocks]
    with torch.device("meta"):
        enc = VaeEncoder(config.vae)
    enc = random_init(enc, "cpu", 6).to(memory_format=torch.channels_last)
    inputs = make_inputs(config, a.size, "cpu", t5_tokens=32)
    slg = SkipLayerGuidance(tuple(range(1, min(3, a.blocks))))
    modes = a.modes.split(",")
    tf, encode = callables(model, enc, choose_attention(torch.device("cpu"), torch.bfloat16))
    lat = lambda m, t: mode_latents(m, config, t, encode, inputs, a.steps, a.strength, slg)  # noqa: E731
    rel = lambda x, r: float((x.double() - r.double()).norm() / r.double().norm())  # noqa: E731
    t0 = time.time()
    with torch.no_grad():
        refs = {m: lat(m, tf) for m in modes}
        if a.control:
            exact = copy.deepcopy(model).float()
            tf32 = lambda x, t, c, p, skip_layers=None: exact(x.float(), t, c.float(), p.float(), skip_layers=skip_layers)  # noqa: E731
            print("control bf16 vs fp32: " + "  ".join(
                f"{m} {cosine(y, refs[m]):.5f} ({rel(y, refs[m]):.4f})" for m, y in ((m, lat(m, tf32)) for m in modes)))
            del exact
        g = torch.Generator().manual_seed(5)
        x = torch.randn(2, *config.latent_shape(1, a.size, a.size)[1:], generator=g).bfloat16()  # [2, 16, S/8, S/8]
        args = (x, torch.full((2,), 700.0), inputs.context.bfloat16(), inputs.pooled.bfloat16())
        runs = lambda ms: calibrate_on_runs(model, config, tf, encode, a.size, a.steps, a.strength, slg, modes=ms,  # noqa: E731
                                            t5_tokens=32)
        amaxes = {"one-step": max_calibrate(model, lambda m: m(*args), EXCLUDE), "runs": runs(("text-to-image",)),
                  "runs+i2i": runs(("text-to-image", "image-to-image"))}
        amaxes["runs adaLN-bf16"] = {k: v for k, v in amaxes["runs"].items() if ".norm1" not in k}
        one, whole = amaxes["one-step"], amaxes["runs"]
        ratio = sorted((whole[k] / one[k], k.rpartition(".")[0]) for k in one if k.endswith("input_quantizer"))
        print(f"input scales, whole runs / one step: {sum(r > 1 for r, _ in ratio)} of {len(ratio)} larger, "
              f"largest {[(round(r, 2), k) for r, k in ratio[-3:]]}", flush=True)
        for name, amax in amaxes.items():
            q = (to_fp8 if a.real else emulated_fp8)(copy.deepcopy(model), amax)
            tq, _ = callables(q, enc, choose_attention(torch.device("cpu"), torch.bfloat16))
            got = {m: lat(m, tq) for m in modes}
            print(f"fp8 calib {name:<16} " + "  ".join(f"{m} {cosine(got[m], refs[m]):.5f} ({rel(got[m], refs[m]):.3f})"
                                                      for m in modes), f"[{time.time() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
