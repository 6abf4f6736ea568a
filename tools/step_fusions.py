"""The torch-fp8 step with each opt-in fusion (runtime/backends/fp8_fusions.py), one process.

  python tools/step_fusions.py OUT.json [--blocks 6] [--budget-s 230] [--plan ...] [--tiny]

The first `--blocks` SD3.5 Large blocks at real widths and token counts (1024², CFG batch 2, random
weights, max calibration), compiled as the runtime's torch-fp8 `compile="reduce-overhead"` does
(fast accumulation, sigmoid GELU, fullgraph, CUDA graphs) with the attention core the runtime
chooses (FlashAttention-4 where it imports, else cuDNN SDPA: `attention` in the JSON says which
and why). Rows in `--plan` order: `baseline`, then each fusion alone, then `best` (every fusion
that beat the baseline by > 0.5 % with cosine >= 0.999, the better persistent variant only), then
`profile` (baseline and best compiled without CUDA graphs: torch.profiler kernels per step by
category). Per row: step ms (median of 20 after 3 warm-ups, CUDA events), first call s, output
cosine vs the baseline. A row starts only if it fits in `--budget-s` (candidates leave room for
`best`, `recheck` and the profiles); `recheck` times the baseline again (a compile-cache hit: the
run's drift). The JSON is rewritten after every row. `--tiny`: CPU, 2 blocks 64 wide at 64², dynamo
+ aot_eager (each row's inductor options are checked against this torch's config).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import signal
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from sd35trt.bench import cosine, random_mmdit, step_inputs, timed_calls
from sd35trt.runtime.backends.fp8_fusions import (FUSIONS, apply_fusions, fusion_options,
                                                  uninstall_persistent_rows)
from sd35trt.runtime.backends.torch_fp8 import compile_options
from sd35trt.runtime.config import VARIANTS
from sd35trt.runtime.models.flash_attention import choose_attention, set_attention_core
from sd35trt.runtime.models.fp8 import HIGH_PRECISION, max_calibrate, to_fp8
from sd35trt.runtime.models.mmdit import use_sigmoid_gelu

T0 = time.perf_counter()
S = {"device": "cuda", "size": 1024, "tiny": False}
CANDIDATES = ("adaln-bank", "persistent-rows", "combo", "mk-persistent", "aggressive", "pointwise-tune", "tune")
SLOW = {"profile": 2.0, "pointwise-tune": 2.0, "tune": 4.0, "recheck": 0.5}  # row time vs a typical row
DEFAULT_PLAN = ",".join(("baseline",) + CANDIDATES[:-1] + ("best", "recheck", "profile", "tune"))  # tune: slow


def now() -> float:
    return time.perf_counter() - T0


def sync() -> None:
    if S["device"] == "cuda":
        torch.cuda.synchronize()


def release(fusions) -> None:
    """After a row: the persistent-row choice handler off again, the row's memory back."""
    if "persistent-rows" in fusions:
        uninstall_persistent_rows()
    gc.collect()
    if S["device"] == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn, iters: int) -> list[float]:
    """Milliseconds of each of `iters` runs (CUDA events on the GPU, wall clock on CPU)."""
    return timed_calls(fn, iters)


def build(blocks: int):
    """The FP8 model of the first `blocks` Large blocks, its step inputs, the attention choice."""
    config = VARIANTS["sd3.5-large"]
    spec = replace(config.transformer, num_layers=blocks)
    if S["tiny"]:
        spec = replace(spec, num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64,
                       joint_attention_dim=64, pooled_projection_dim=64)
    cfg = replace(config, transformer=spec)
    with torch.inference_mode():
        model = random_mmdit(cfg, torch.bfloat16, S["device"])
        args = step_inputs(cfg, S["size"], 1, S["device"], torch.bfloat16)  # latents [2, 16, 128, 128], ...
        amax = max_calibrate(model, lambda m: m(*args), HIGH_PRECISION)
        m8 = to_fp8(model, amax, fast_accum=True)
        use_sigmoid_gelu(m8)
    choice = choose_attention(S["device"], torch.bfloat16)
    set_attention_core(m8, choice.core)
    return m8, args, choice


@torch.inference_mode()
def bank_parity(m8, args) -> dict:
    """The adaLN bank's outputs vs the per-block projections on this device, eager (a copy)."""
    try:
        from sd35trt.runtime.models.adaln_bank import batch_adaln

        temb = m8.time_text_embed(args[1], args[3])  # [B, D]
        ref = [t for b in m8.transformer_blocks for t in b.norm1(temb) + b.norm1_context(temb)]
        got = [t for pair in batch_adaln(copy.deepcopy(m8))(temb) for t in pair[0] + pair[1]]
        diff = [(g.float() - r.float()).abs() for g, r in zip(got, ref)]
        rel = max(float((d / r.float().abs().clamp_min(1e-2)).max()) for d, r in zip(diff, ref))
        return {"max_abs": max(float(d.max()) for d in diff), "max_rel": rel,
                "bit_equal": all(torch.equal(g, r) for g, r in zip(got, ref)),
                "cos": cosine(torch.cat([g.flatten() for g in got]), torch.cat([r.flatten() for r in ref]))}
    except Exception as e:
        return {"error": repr(e)[:300]}


def options_for(fusions: tuple[str, ...], graphs: bool) -> dict:
    base = compile_options("reduce-overhead" if graphs else "default")
    return {**base, **fusion_options(fusions)}


def compiled(model, options: dict):
    torch._dynamo.reset()
    if S["tiny"]:  # no C++/Triton compile on this CPU: check the options' names, run dynamo + AOT autograd
        with torch._inductor.config.patch(options):
            pass
        return torch.compile(model, fullgraph=True, backend="aot_eager")
    return torch.compile(model, fullgraph=True, options=options)


def variant(m8, fusions: tuple[str, ...]):
    """A copy of the model with the fusions' model-side parts applied (the copy only if any)."""
    if "adaln-bank" not in fusions and "persistent-rows" not in fusions:
        return m8
    m = copy.deepcopy(m8) if "adaln-bank" in fusions else m8
    apply_fusions(m, fusions)
    return m


def step_row(name: str, m8, args, fusions: tuple[str, ...], ctx, ref) -> tuple[dict, torch.Tensor | None]:
    row = {"name": name, "fusions": list(fusions)}
    try:
        model = variant(m8, fusions)
        fn = compiled(model, options_for(fusions, graphs=True))
        with torch.inference_mode(), ctx():
            t = time.perf_counter()
            y = fn(*args)
            sync()
            row["first_call_s"] = round(time.perf_counter() - t, 2)
            y = y.float().clone()  # CUDA-graph outputs are overwritten by the next replay
            time_ms(lambda: fn(*args), 0 if S["tiny"] else 3)
            times = time_ms(lambda: fn(*args), 1 if S["tiny"] else 20)
        row["step_ms"] = round(statistics.median(times), 3)
        row["spread_ms"] = [round(min(times), 3), round(max(times), 3)]
        row["cos_vs_baseline"] = 1.0 if ref is None else round(cosine(y, ref), 6)
        return row, y
    except Exception as e:  # one failing row must not lose the others
        row["error"] = repr(e)[:400]
        return row, None
    finally:
        fn = model = None
        release(fusions)


CATEGORIES = ("fp8_gemm", "attention", "elementwise_reduction", "copies", "other")


def category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "cudnn", "attention", "sdpa", "fwd_sm90", "fwdsm90")):
        return "attention"
    if any(k in n for k in ("nvjet", "gemm", "cutlass", "xmma", "scaled_mm", "matmul", "addmm", "aten::mm")):
        return "fp8_gemm"
    if n.startswith("triton_") or "elementwise" in n or "reduce" in n:
        return "elementwise_reduction"
    if any(k in n for k in ("memcpy", "memset", "copy", "cat")):
        return "copies"
    return "other"


def profile_row(name: str, m8, args, fusions: tuple[str, ...], ctx, steps: int = 3) -> dict:
    """Compiled without CUDA graphs; kernels per step by category (count, µs), the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    out = {"name": name, "fusions": list(fusions)}
    try:
        model = variant(m8, fusions)
        fn = compiled(model, options_for(fusions, graphs=False))
        cuda = S["device"] == "cuda"
        with torch.inference_mode(), ctx():
            fn(*args), fn(*args), sync()
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    fn(*args)
                sync()
        kind = DeviceType.CUDA if cuda else DeviceType.CPU
        evts = [e for e in prof.key_averages() if e.device_type == kind]
        us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
        cats = {c: {"kernels": 0.0, "us": 0.0} for c in CATEGORIES}
        for e in evts:
            c = cats[category(e.key)]
            c["kernels"] += e.count / steps
            c["us"] += us(e) / steps
        out["by_category"] = {c: {k: round(v, 1) for k, v in d.items()} for c, d in cats.items()}
        out["kernels_per_step"] = round(sum(d["kernels"] for d in cats.values()), 1)
        out["kernel_us_per_step"] = round(sum(d["us"] for d in cats.values()), 1)
        top = sorted(evts, key=lambda e: -us(e))[:25]
        out["top"] = [[e.key[:100], category(e.key), round(e.count / steps, 1), round(us(e) / steps, 1)] for e in top]
    except Exception as e:
        out["error"] = repr(e)[:400]
    finally:
        fn = model = None
        release(fusions)
    return out


def pick_best(rows: list[dict]) -> tuple[str, ...]:
    """Every fusion that beat the baseline by > 0.5 % with cosine >= 0.999; one persistent variant."""
    base = rows[0].get("step_ms")
    if S["tiny"]:  # the CPU smoke run: every candidate is slower there; combine the first two that ran
        return tuple(r["name"] for r in rows[1:] if "step_ms" in r and r["name"] in FUSIONS)[:2]
    wins = {r["name"]: r["step_ms"] for r in rows[1:] if "step_ms" in r and r["name"] in FUSIONS
            and base and r["step_ms"] < 0.995 * base and r.get("cos_vs_baseline", 0) >= 0.999}
    if "persistent-rows" in wins and "mk-persistent" in wins:
        del wins[max(("persistent-rows", "mk-persistent"), key=wins.get)]
    return tuple(n for n in CANDIDATES if n in wins)


def profile_target(doc: dict) -> tuple[str, tuple[str, ...]]:
    """What to profile beside the baseline: `best` if it ran, else the fastest single fusion."""
    if doc.get("best"):
        return "best", tuple(doc["best"])
    singles = [r for r in doc["rows"][1:] if "step_ms" in r and r["name"] in FUSIONS]
    if not singles:
        return "", ()
    r = min(singles, key=lambda r: r["step_ms"])
    return r["name"], (r["name"],)


def save(doc: dict, out: Path) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)


def run_plan(doc: dict, out: Path, plan: list[str], budget_s: float, blocks: int) -> None:
    m8, args, choice = build(blocks)
    doc["attention"] = {"name": choice.name, "reason": choice.reason}
    print(f"[{now():.0f} s] model ready, attention {choice.name} {choice.reason}", flush=True)
    doc["adaln_bank_parity"] = bank_parity(m8, args)
    print(f"[{now():.0f} s] adaLN bank vs per-block projections (eager): {doc['adaln_bank_parity']}", flush=True)
    save(doc, out)
    ctx, rows, ref, typical = choice.context, doc["rows"], None, []  # seconds of the rows without a SLOW factor
    for item in plan:
        reserve = 0.0 if item in ("best", "recheck", "profile") else 3.0 * rows[0].get("row_s", 0.0) if rows else 0.0
        # the 2026-12-01 H200 run: tune took 56.8 s against 13-21 s for the others; estimating the
        # profile from the longest row then skipped it with 56 s left, so estimate from typical rows
        need = (max(typical) if typical else 0.0) * SLOW.get(item, 1.0) + reserve
        if rows and now() + need > budget_s:
            rows.append({"name": item, "skipped": f"time budget {budget_s:.0f} s (at {now():.0f} s)"})
            print(f"[{now():.0f} s] skipped {item}", flush=True)
            continue
        t = time.perf_counter()
        if item == "profile":
            doc["profile"] = [profile_row("baseline", m8, args, (), ctx)]
            save(doc, out)
            label, fusions = profile_target(doc)
            if fusions:
                doc["profile"].append(profile_row(label, m8, args, fusions, ctx))
            for p in doc["profile"]:
                print(f"[{now():.0f} s] profile {p['name']}: {p.get('by_category', p.get('error'))}", flush=True)
        else:
            if item == "best":
                fusions = tuple(doc.setdefault("best", list(pick_best(rows))))
            else:
                fusions = () if item in ("baseline", "recheck") else (item,)
            if item == "best" and not fusions:
                rows.append({"name": "best", "skipped": "no fusion beat the baseline"})
                continue
            row, y = step_row(item, m8, args, fusions, ctx, ref)
            ref = y if item == "baseline" else ref
            row["row_s"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(f"[{now():.0f} s] {row}", flush=True)
        if item not in SLOW:
            typical.append(time.perf_counter() - t)
        save(doc, out)
    ratios(doc)


def ratios(doc: dict) -> None:
    """vs_baseline per row; per profile, the CUDA-graph step of that row minus its kernels (the gaps)."""
    rows = doc["rows"]
    base = rows[0].get("step_ms") if rows else None
    for r in rows:
        if base and "step_ms" in r:
            r["vs_baseline"] = round(r["step_ms"] / base, 4)
    graphs = {r["name"]: r["step_ms"] for r in rows if "step_ms" in r}
    for p in doc.get("profile", []):  # the CUDA-graph step minus the kernels: the gaps between them
        if "kernel_us_per_step" in p and p["name"] in graphs:
            p["graph_step_minus_kernels_ms"] = round(graphs[p["name"]] - p["kernel_us_per_step"] / 1e3, 3)


def summary(doc: dict) -> None:
    ratios(doc)
    wall = doc.get("wall_s") or f"{doc.get('terminated_at_s')} (stopped by timeout)"
    print(f"\n== step fusions: {doc['device']}, torch {doc['torch']}, first {doc['blocks']} Large blocks, "
          f"{doc['size']}², attention {doc.get('attention', {}).get('name')}, wall {wall} s")
    print(f"{'row':<18} {'step ms':>9} {'vs base':>8} {'first s':>8} {'cos':>9}")
    for r in doc["rows"]:
        extra = r.get("skipped") or r.get("error") or ""
        print(f"{r['name']:<18} {r.get('step_ms', '-'):>9} {r.get('vs_baseline', '-'):>8} "
              f"{r.get('first_call_s', '-'):>8} {r.get('cos_vs_baseline', '-'):>9} {extra[:120]}")
    print(f"best = {doc.get('best')}")
    for p in doc.get("profile", []):
        print(f"profile {p['name']} (no CUDA graphs): {p.get('kernels_per_step')} kernels, "
              f"{p.get('kernel_us_per_step')} us/step; CUDA-graph step minus kernels "
              f"{p.get('graph_step_minus_kernels_ms')} ms {p.get('error', '')}")
        for c, d in p.get("by_category", {}).items():
            print(f"   {c:<22} {d['kernels']:>7} kernels {d['us']:>10} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--budget-s", type=float, default=230.0, help="start no row that would end after this (s)")
    ap.add_argument("--plan", default=DEFAULT_PLAN, help=f"rows in order; first = baseline; names: baseline, "
                    f"{', '.join(CANDIDATES)}, best, recheck (the baseline again: the drift), profile")
    ap.add_argument("--tiny", action="store_true", help="CPU, 2 blocks 64 wide at 64² (a smoke run)")
    a = ap.parse_args()
    plan = a.plan.split(",")
    bad = [p for p in plan if p not in ("baseline", "best", "recheck", "profile") + CANDIDATES]
    if bad or plan[0] != "baseline":
        raise SystemExit(f"--plan {a.plan!r}: unknown {bad} or not starting with baseline")
    if a.tiny:
        S.update(device="cpu", size=64, tiny=True)
    out = Path(a.out)
    blocks = 2 if a.tiny else a.blocks
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    device = torch.cuda.get_device_name() if S["device"] == "cuda" else "cpu"
    doc = {"device": device, "torch": torch.__version__, "triton": triton_v, "size": S["size"], "batch": 1,
           "blocks": blocks, "plan": plan, "rows": []}
    save(doc, out)

    def on_term(*_):  # `timeout` in tools/h18s_gpu.sh: keep the rows done and print their table
        doc["terminated_at_s"] = round(now(), 1)
        save(doc, out)
        summary(doc)
        sys.exit(124)

    signal.signal(signal.SIGTERM, on_term)
    run_plan(doc, out, plan, a.budget_s, blocks)
    doc["wall_s"] = round(now(), 1)
    save(doc, out)
    summary(doc)


if __name__ == "__main__":
    main()
