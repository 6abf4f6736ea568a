"""Where the FP8 LoRA side path's time goes at SD3.5 Large shapes (H200), in one process:

  python tools/lora_gemm_probe.py OUT.json [--blocks N]

1. cuBLAS `_scaled_mm` alone, M = 8192 image rows (1024², CFG pair): each block's base GEMM, the
   same with K grown by the joined LoRA columns (catk), and the skinny down-projections
   [M, K] x [K, G·R] (rank 16, 64); µs per call (CUDA graph of 50 calls, median of 5 replays).
2. torch.profiler over the compiled (inductor, no CUDA graphs) first `--blocks` blocks: no LoRA vs
   each side-path variant at rank 64: kernels per step and µs per step by kernel name (top 12).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_bench as lb  # noqa: E402
from sd35trt.bench import graph_ms  # noqa: E402
from sd35trt.runtime.models.fp8 import E4M3  # noqa: E402


def graph_us(fn, calls: int = 50) -> float:
    return round(graph_ms(fn, calls) * 1e3, 2)


JOINED_ONLY = False  # --joined-only: the base and K_cat GEMMs, not the down-projections


def gemm_table(m: int = 8192) -> list[dict]:
    one = torch.ones((), device="cuda")
    rows = []
    shapes = {"qkv": (2432, 7296, 3), "out": (2432, 2432, 1), "ff.0": (2432, 9728, 1), "ff.2": (9728, 2432, 1)}
    for name, (k, n, g) in shapes.items():
        cat = [(-(-(k + g * r) // 128) * 128, f"base K_cat (catk r{r})") for r in (16, 64)]
        for kk, what in [(k, "base")] + (cat if JOINED_ONLY else [(k + g * r, f"base K+{g * r} (r{r})") for r in (16, 64)] + cat):
            x = torch.randn(m, kk, device="cuda").to(E4M3)
            w = torch.randn(n, kk, device="cuda").to(E4M3)
            rows.append({"gemm": name, "what": what, "M": m, "K": kk, "N": n,
                         "us": graph_us(lambda: torch._scaled_mm(x, w.t(), scale_a=one, scale_b=one,
                                                                   out_dtype=torch.bfloat16, use_fast_accum=True))})
        if JOINED_ONLY:
            continue
        x = torch.randn(m, k + 192, device="cuda").to(E4M3)
        for r in (16, 64):
            a = torch.randn(g * r, k, device="cuda").to(E4M3)
            for view, xv in (("contiguous", x[:, :k].contiguous()), ("strided", x[:, :k])):
                rows.append({"gemm": name, "what": f"down r{r} ({view} x)", "M": m, "K": k, "N": g * r,
                             "us": graph_us(lambda: torch._scaled_mm(xv, a.t(), scale_a=one, scale_b=one,
                                                                       out_dtype=torch.bfloat16, use_fast_accum=True))})
            ab = torch.randn(g * r, k, device="cuda", dtype=torch.bfloat16)
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            rows.append({"gemm": name, "what": f"down r{r} bf16", "M": m, "K": k, "N": g * r,
                         "us": graph_us(lambda: torch.nn.functional.linear(xb, ab))})
        print(rows[-1], flush=True)
    return rows


@torch.inference_mode()
def compiled_profile(blocks: int, variants: list[str]) -> dict:
    from dataclasses import replace

    from torch.profiler import ProfilerActivity, profile

    cfg = replace(lb.VARIANTS["sd3.5-large"], transformer=replace(lb.VARIANTS["sd3.5-large"].transformer,
                                                                  num_layers=blocks))
    model = lb.random_mmdit(cfg, torch.bfloat16, "cuda")
    args = lb.step_inputs(cfg, 1024, 1, "cuda", torch.bfloat16)
    amax = lb.max_calibrate(model, lambda m: m(*args), lb.HIGH_PRECISION)
    lora = lb.random_lora(model, 64, seed=64)
    m8 = lb.to_fp8(model, amax, fast_accum=True)
    lb.use_sigmoid_gelu(m8)
    out = {}
    for v in ["none"] + variants:
        if v != "none":
            lb.attach({"transformer": m8}, lora, 0, lb.bank_for(1, 64, v))
        torch._dynamo.reset()
        try:
            fn = torch.compile(m8, fullgraph=True, options=lb.compile_options("default"))
            for _ in range(3):
                fn(*args)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fn(*args)
                torch.cuda.synchronize()
            ev = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
            out[v] = {"kernels_per_step": round(sum(e.count for e in ev) / 3, 1),
                      "kernel_us_per_step": round(sum(e.device_time_total for e in ev) / 3, 1),
                      "kernels": [[e.key[:110], round(e.count / 3, 1), round(e.device_time_total / 3, 1)] for e in ev]}
        except Exception as e:  # keep the other variants' tables
            out[v] = {"error": repr(e)[:400]}
        finally:
            if v != "none":
                lb.uninstall(m8)
        print(v, {k: x for k, x in out[v].items() if k != "kernels"}, flush=True)
    base = {k[0]: k for k in out.get("none", {}).get("kernels", [])}
    for v in variants:  # what each variant added: its kernels not in the no-LoRA step, and changed ones
        rows = []
        for name, n, us in out.get(v, {}).get("kernels", []):
            _, n0, us0 = base.get(name, (name, 0, 0.0))
            if abs(us - us0) > 5:
                rows.append((round(us - us0, 1), n - n0, name))
        out[f"{v}_minus_none"] = sorted(rows, reverse=True)
        print(f"--- {v} minus none (us/step, kernels/step, kernel)")
        for r in out[f"{v}_minus_none"][:30]:
            print(f"{r[0]:>9} {r[1]:>5} {r[2]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--variants", default="delta,catk,fp8down")
    ap.add_argument("--joined-only", action="store_true", help="GEMM table: base and K_cat shapes only")
    a = ap.parse_args()
    global JOINED_ONLY
    JOINED_ONLY = a.joined_only
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    doc["gemms"] = gemm_table()
    Path(a.out).write_text(json.dumps(doc, indent=1))
    doc["compiled_profile"] = compiled_profile(a.blocks, a.variants.split(","))
    Path(a.out).write_text(json.dumps(doc, indent=1))
    for r in doc["gemms"]:
        print(f"{r['gemm']:<5} {r['what']:<28} K={r['K']:<6} N={r['N']:<6} {r['us']:>8} us")


if __name__ == "__main__":
    main()
