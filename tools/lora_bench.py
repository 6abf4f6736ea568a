"""LoRA on the FP8 MMDiT at real SD3.5 Large shapes (random weights): cost and fidelity.

  python tools/lora_bench.py OUT.json [--blocks N] [--budget-s S] [--tiny]

Fidelity, full depth (38 blocks), eager: one CFG step at 1024² (batch 1 -> 2 rows) of the FP8
MMDiT with a random rank-64 LoRA on every attention and FF Linear (q/k/v/out, add_q/k/v/add_out,
ff, ff_context) through each side-path variant (models/lora_fp8.py) and fused (fuse=True, from the
bf16 weights as the runtime does from a checkpoint: one E4M3 rounding), each
vs the BF16 MMDiT with the same LoRA (side path in bf16); FP8 without LoRA vs BF16 without LoRA.

Cost: the same step compiled as the runtime's torch-fp8 compile="reduce-overhead" (fast
accumulation, sigmoid GELU, CUDA graphs) on the first `--blocks` blocks (real widths and token
counts), rows in `--plan` order: `alternate` (no LoRA and fuse=True, compiled side by side and
timed in alternating rounds: the spread of the per-round ratio is the noise), `plain` (no LoRA),
`VARIANT:RANK` (one slot), `alt:VARIANT:RANK` (that side path and no LoRA, compiled side by side and
timed in alternating rounds, as `alternate`), `profile` (eager kernels per step with torch.profiler: no LoRA, delta,
splitk). A row is skipped (and says so) when it would start after `--budget-s`. The JSON is
rewritten after every row, and the end prints a table and the variant to make the default.
`--tiny`: a 2-block, 64-wide model at 64² on CPU (dynamo fullgraph + aot_eager): proves the code path.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from sd35trt.bench import cosine, random_mmdit, step_inputs, timed_calls
from sd35trt.runtime.backends.torch_fp8 import compile_options
from sd35trt.runtime.config import VARIANTS
from sd35trt.runtime.lora import attach, fuse_lora
from sd35trt.runtime.lora_files import LoraFile, LoraPart
from sd35trt.runtime.lora_source import fused_source
from sd35trt.runtime.models.fp8 import HIGH_PRECISION, max_calibrate, to_fp8
from sd35trt.runtime.models.lora_fp8 import VARIANTS as SIDE_VARIANTS
from sd35trt.runtime.models.lora_linear import DEFAULT_VARIANT, LoraBank, uninstall
from sd35trt.runtime.models.mmdit import use_sigmoid_gelu

TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2")
T0 = time.perf_counter()
S = {"device": "cuda", "size": 1024, "mode": "reduce-overhead"}  # set once in main (--tiny: cpu)


def random_lora(model: torch.nn.Module, rank: int, seed: int) -> LoraFile:
    """A LoRA on every attention/FF Linear: A ~ N(0, 0.02), B sized so that |BA| ~ 0.3 |W|."""
    g = torch.Generator(device=S["device"]).manual_seed(seed)
    parts = {}
    for i, block in enumerate(model.transformer_blocks):
        for t in TARGETS:
            try:
                lin = block.get_submodule(t)
            except AttributeError:  # the last block has no context output / ff_context
                continue
            a = torch.randn(rank, lin.in_features, generator=g, device=S["device"]) * 0.02
            b = torch.randn(lin.out_features, rank, generator=g, device=S["device"]) * (0.3 / rank ** 0.5)
            parts[f"transformer_blocks.{i}.{t}"] = LoraPart(a, b)
    return LoraFile(Path(f"random-rank{rank}"), "", {"transformer": parts})


def bank_for(slots: int, rank: int, variant: str, dtype=torch.bfloat16):
    bank = LoraBank(slots, rank, torch.device(S["device"]), dtype, variant=variant)
    bank.set_rows(torch.ones(2, slots))  # the CFG rows at strength 1 (slot 0; others zero)
    bank.strengths[:, 1:].zero_()
    return lambda comp, model: bank


def sync() -> None:
    if S["device"] == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, iters: int) -> list[float]:
    """Milliseconds of each of `iters` runs (CUDA events on the GPU, wall clock on CPU)."""
    return timed_calls(fn, iters)


@torch.inference_mode()
def fidelity(config) -> dict:
    model = random_mmdit(config, torch.bfloat16, S["device"])
    args = step_inputs(config, S["size"], 1, S["device"], torch.bfloat16)
    plain_ref = model(*args).float()
    amax = max_calibrate(model, lambda m: m(*args), HIGH_PRECISION)  # calibrated without the LoRA
    lora = random_lora(model, 64, seed=3)
    attach({"transformer": model}, lora, 0, bank_for(1, 64, "delta"))
    ref = model(*args).float()  # bf16 with the LoRA (side path in bf16)
    uninstall(model)
    src = {k: v.detach().cpu() for k, v in model.state_dict().items() if k.endswith(".weight")}  # bf16, host
    m8 = to_fp8(model, amax, fast_accum=True)
    use_sigmoid_gelu(m8)
    plain8 = m8(*args).float()
    out = {"fp8_no_lora_cos_vs_bf16": cosine(plain8, plain_ref), "bf16_lora_vs_no_lora_cos": cosine(ref, plain_ref)}
    sides = {}
    for variant in SIDE_VARIANTS:
        attach({"transformer": m8}, lora, 0, bank_for(1, 64, variant))
        try:
            sides[variant] = m8(*args).float()
            out[f"side_{variant}_cos_vs_bf16_lora"] = cosine(sides[variant], ref)
        except Exception as e:  # one variant failing must not lose the others
            print(f"fidelity {variant} failed: {e!r}"[:400], flush=True)
            out[f"side_{variant}_cos_vs_bf16_lora"] = float("nan")
        finally:
            uninstall(m8)
        print(f"[{time.perf_counter() - T0:.0f} s] fidelity {variant}: {out[f'side_{variant}_cos_vs_bf16_lora']:.5f}",
              flush=True)
    sides.setdefault("delta", ref)
    fuse_lora({"transformer": m8}, lora, 1.0, lambda _, t: fused_source(src.get, t, torch.bfloat16))  # as from a ckpt
    fused = m8(*args).float()
    out |= {"fused_cos_vs_bf16_lora": cosine(fused, ref), "fused_cos_vs_side_delta": cosine(fused, sides["delta"])}
    del model, m8
    if S["device"] == "cuda":
        torch.cuda.empty_cache()
    return {k: round(v, 5) for k, v in out.items()}


def compiled(m8, args):
    """torch.compile as the runtime's torch-fp8 backend does, and the first call's seconds."""
    if S["device"] == "cpu":  # --tiny: dynamo + AOT autograd (functionalized graph) without C++ compiles
        fn = torch.compile(m8, fullgraph=True, backend="aot_eager")
    else:
        fn = torch.compile(m8, fullgraph=True, options=compile_options(S["mode"]))
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn(*args)
        sync()
    return fn, time.perf_counter() - t0


def alternate(m8, args, rounds: int, iters: int, side: tuple[str, int, int] | None = None) -> list[dict]:
    """No LoRA and fuse=True (rank 64) — or, with `side` = (variant, rank), that side path — compiled
    side by side and timed in alternating rounds (the spread of the per-round ratio is the noise)."""
    with torch.inference_mode():
        fused = copy.deepcopy(m8)
        if side is None:
            fuse_lora({"transformer": fused}, random_lora(m8, 64, seed=64), 1.0)
        else:
            attach({"transformer": fused}, random_lora(m8, side[1], seed=side[1]), 0, bank_for(side[2], side[1], side[0]))
    torch._dynamo.reset()
    fn_plain, first_plain = compiled(m8, args)
    fn_fused, first_fused = compiled(fused, args)
    plain, fz, ratios = [], [], []
    with torch.inference_mode():
        for f in (fn_plain, fn_fused):
            time_ms(lambda: f(*args), 0 if S["device"] == "cpu" else 3)  # warm-up
        for r in range(rounds):
            order = (fn_plain, fn_fused) if r % 2 == 0 else (fn_fused, fn_plain)
            got = {id(f): statistics.median(time_ms(lambda: f(*args), iters)) for f in order}
            plain.append(got[id(fn_plain)]), fz.append(got[id(fn_fused)])
            ratios.append(fz[-1] / plain[-1])
    base = statistics.median(plain)
    rows = [{"name": "fp8, no LoRA", "step_ms": round(base, 3), "first_call_s": round(first_plain, 1),
             "rounds_ms": [round(t, 3) for t in plain]},
            {"name": "fused rank 64 (fuse=True)" if side is None else f"side {side[0]} rank {side[1]}, {side[2]} slot(s) (alternating)",
             **({} if side is None else {"variant": side[0], "rank": side[1], "slots": side[2]}), "step_ms": round(statistics.median(fz), 3),
             "first_call_s": round(first_fused, 1), "rounds_ms": [round(t, 3) for t in fz],
             "vs_no_lora_per_round": {"min": round(min(ratios), 4), "median": round(statistics.median(ratios), 4),
                                      "max": round(max(ratios), 4)}}]
    del fused, fn_fused
    return rows


def side_row(m8, args, lora, variant: str, rank: int, iters: int) -> dict:
    with torch.inference_mode():
        attach({"transformer": m8}, lora, 0, bank_for(1, rank, variant))
    torch._dynamo.reset()
    try:
        fn, first = compiled(m8, args)
        with torch.inference_mode():
            time_ms(lambda: fn(*args), 0 if S["device"] == "cpu" else 3)
            ms = statistics.median(time_ms(lambda: fn(*args), iters))
        return {"name": f"side {variant} rank {rank}", "variant": variant, "rank": rank, "step_ms": round(ms, 3),
                "first_call_s": round(first, 1)}
    except Exception as e:  # one variant failing must not lose the others' rows
        return {"name": f"side {variant} rank {rank}", "variant": variant, "rank": rank, "error": repr(e)[:300]}
    finally:
        uninstall(m8)


def plain_row(m8, args, iters: int) -> dict:
    torch._dynamo.reset()
    fn, first = compiled(m8, args)
    with torch.inference_mode():
        time_ms(lambda: fn(*args), 0 if S["device"] == "cpu" else 3)
        ms = statistics.median(time_ms(lambda: fn(*args), iters))
    return {"name": "fp8, no LoRA", "step_ms": round(ms, 3), "first_call_s": round(first, 1)}


@torch.inference_mode()
def profile(m8, args, lora, variants: tuple[str, ...], steps: int) -> dict:
    """Eager (no compile: the LoRA GEMMs are the same cuBLAS calls as compiled) kernels per step:
    no LoRA and each variant at rank 64: kernel count, summed kernel µs, and the top kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = {}
    for variant in ("none",) + variants:
        if variant != "none":
            attach({"transformer": m8}, lora, 0, bank_for(1, 64, variant))
        try:
            m8(*args), sync()  # warm-up outside the trace
            cuda = S["device"] == "cuda"
            with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    m8(*args)
                sync()
            us = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # --tiny: CPU ops
            evts = sorted((e for e in prof.key_averages() if us(e) > 0), key=lambda e: -us(e))
            out[variant] = {"kernels_per_step": round(sum(e.count for e in evts) / steps, 1),
                            "kernel_us_per_step": round(sum(us(e) for e in evts) / steps, 1),
                            "top": [[e.key[:90], round(e.count / steps, 1), round(us(e) / steps, 1)]
                                    for e in evts[:14]]}
        except Exception as e:  # the profile must not lose the rows measured after it
            out[variant] = {"error": repr(e)[:300]}
        finally:
            if variant != "none":
                uninstall(m8)
        print(f"profile {variant}: {out[variant].get('kernels_per_step')} kernels, "
              f"{out[variant].get('kernel_us_per_step')} us/step", flush=True)
    return out


DEFAULT_PLAN = "alternate,catk:64,fp8down:64,addmm:64,delta:64,catk:16,fp8down:16,addmm:16"


def cost(config, blocks: int, budget_s: float, doc: dict, out: Path, plan: list[str]) -> None:
    cfg = replace(config, transformer=replace(config.transformer, num_layers=blocks))
    with torch.inference_mode():
        model = random_mmdit(cfg, torch.bfloat16, S["device"])
        args = step_inputs(cfg, S["size"], 1, S["device"], torch.bfloat16)
        amax = max_calibrate(model, lambda m: m(*args), HIGH_PRECISION)
        loras = {r: random_lora(model, r, seed=r) for r in (16, 64)}
        m8 = to_fp8(model, amax, fast_accum=True)
        use_sigmoid_gelu(m8)
    rows, tiny = doc["cost"], S["device"] == "cpu"
    longest = 0.0
    for item in plan:
        name, _, rank = item.partition(":")
        if rows and time.perf_counter() - T0 + longest > budget_s:
            rows.append({"name": item, "skipped": f"time budget {budget_s:.0f} s"})
            continue
        t = time.perf_counter()
        if name == "alternate":
            rows += alternate(m8, args, rounds=1 if tiny else 8, iters=1 if tiny else 10)
        elif name == "alt":  # alt:VARIANT:RANK: that side path alternating with no LoRA
            variant, _, r = rank.partition(":")
            r, _, slots = r.partition("x")  # alt:catk:64x2: a bank of 2 slots × 64 (the runtime's default), slot 0 used
            rows += alternate(m8, args, rounds=1 if tiny else 6, iters=1 if tiny else 10,
                              side=(variant, int(r), int(slots or 1)))[1:]
        elif name == "plain":
            rows.append(plain_row(m8, args, iters=1 if tiny else 20))
        elif name == "profile":
            doc["profile_eager_rank64"] = profile(m8, args, loras[64], ("delta", "splitk"), steps=1 if tiny else 3)
        else:
            rows.append(side_row(m8, args, loras[int(rank)], name, int(rank), iters=1 if tiny else 20))
        longest = max(longest, time.perf_counter() - t)
        print(f"[{time.perf_counter() - T0:.0f} s] {rows[-1] if name != 'profile' else 'profile done'}", flush=True)
        save(doc, out)
    base = rows[0]["step_ms"]
    for r in rows:
        if "step_ms" in r:
            alt = r.get("vs_no_lora_per_round")  # alternating rows: the median per-round ratio
            r["vs_no_lora"] = alt["median"] if alt else round(r["step_ms"] / base, 4)


def save(doc: dict, out: Path) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out)


def pick(doc: dict) -> str:
    """The fastest variant (mean ratio over the ranks measured) whose full-depth cosine is within
    1e-3 of the plain side path's (`delta`)."""
    fid, best = doc.get("fidelity_full_depth", {}), {}
    floor = fid.get("side_delta_cos_vs_bf16_lora", 1.0) - 1e-3
    for r in doc["cost"]:
        v = r.get("variant")
        if v and "vs_no_lora" in r and fid.get(f"side_{v}_cos_vs_bf16_lora", 0.0) >= floor:
            best.setdefault(v, []).append(r["vs_no_lora"])
    if not best:
        return DEFAULT_VARIANT
    return min(best, key=lambda v: statistics.mean(best[v]))


def summary(doc: dict) -> None:
    print(f"\n== LoRA bench: {doc['device']}, {doc['blocks_timed']} blocks timed, {doc['size']}², wall "
          f"{doc['wall_s']} s")
    for variant, p in doc.get("profile_eager_rank64", {}).items():
        print(f"profile (eager, rank 64) {variant}: {p.get('kernels_per_step')} kernels/step, "
              f"{p.get('kernel_us_per_step')} us/step; top: {p.get('top', p.get('error'))[:6]}")
    for r in doc["cost"]:
        extra = r.get("vs_no_lora_per_round") or r.get("skipped") or r.get("error") or ""
        print(f"{r['name']:<34} {r.get('step_ms', '-'):>9} ms  x{r.get('vs_no_lora', '-')}  {extra}")
    for k, v in doc.get("fidelity_full_depth", {}).items():
        print(f"{k:<40} {v}")
    print(f"recommended DEFAULT_VARIANT (runtime/models/lora_linear.py): {doc['recommended_variant']!r} "
          f"(now {DEFAULT_VARIANT!r})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=140.0, help="start no compiled row after this (s)")
    ap.add_argument("--tiny", action="store_true", help="CPU, a 2-block 64-wide model at 64² (a smoke run)")
    ap.add_argument("--no-fidelity", action="store_true", help="cost rows only")
    ap.add_argument("--plan", default=DEFAULT_PLAN, help="rows in order: alternate (no LoRA and fuse=True) | "
                    "plain (no LoRA) | profile (eager kernels: none, delta, splitk) | VARIANT:RANK | alt:VARIANT:RANK "
                    "(that side path alternating with no LoRA; RANKx2: 2 slots) ; first = baseline")
    a = ap.parse_args()
    config = VARIANTS["sd3.5-large"]
    if a.tiny:
        S.update(device="cpu", size=64, mode="default")
        config = replace(config, transformer=replace(config.transformer, num_layers=2, num_attention_heads=2,
                                                     attention_head_dim=32, caption_projection_dim=64,
                                                     joint_attention_dim=64, pooled_projection_dim=64))
    out = Path(a.out)
    device = torch.cuda.get_device_name() if S["device"] == "cuda" else "cpu"
    doc = {"device": device, "torch": torch.__version__, "size": S["size"], "batch": 1,
           "blocks_timed": 2 if a.tiny else a.blocks,
           "cost": []}
    if not a.no_fidelity:
        doc["fidelity_full_depth"] = fidelity(config)
        print(doc["fidelity_full_depth"], flush=True)
    save(doc, out)
    cost(config, a.blocks if not a.tiny else 2, a.budget_s, doc, out, a.plan.split(","))
    doc["recommended_variant"] = pick(doc)
    doc["wall_s"] = round(time.perf_counter() - T0, 1)
    save(doc, out)
    summary(doc)


if __name__ == "__main__":
    main()
