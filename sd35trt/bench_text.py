"""`sd35trt bench --configs text`: the three text encoders (CLIP-L, CLIP-G, T5-XXL) for one CFG
prompt pair, the peer and ours in one process, timed in interleaved rounds.

Peer: transformers BF16 eager. Ours: the torch-fp8 backend's own text path on the same random
weights: T5 calibrated over calibration pairs (`export.calibrate`'s ids and statistic, what the
export and the engine-set build store), converted by `models.fp8_text.t5_precision` (FP8 GEMMs,
`wo` weight-only) and compiled with the CLIPs by `compile_text_encoders`, as `TorchFP8Backend`
does with `compile` set; each encoder called through the torch backend's component callables and
`runtime.text.PromptEncoder`. Also timed: ours eager (the same FP8 T5, nothing compiled) and the
previous product (T5 weight-only FP8, eager).

Rounds: every round times each configuration `iters` times after two warm-up calls, the order
rotating between rounds, so clock and thermal drift hit all alike; a row's time is the median of
all its calls, its ratio the median over rounds of (its round median / the peer's). Context cosine
is on held-out pairs (the last lines of calib_prompts/ with `--tokenizers`, else seeded ids not
used for calibration) against the peer's context of the same pair. `compile_s`: the compiled
encoders' first call (tracing and inductor compile of all three).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from sd35trt.bench import Runner, cosine, free, sync, timed_calls
from sd35trt.bench_e2e import CLIP_G, CLIP_L, T5_XXL, _Pretokenized, text_encoders
from sd35trt.runtime.config import VARIANTS, VariantConfig

# CPU checks of the bench itself (`--tiny`): same structure, tiny widths (figures meaningless).
TINY = (dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
        dict(CLIP_G, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, projection_dim=48),
        dict(T5_XXL, d_model=96, d_ff=128, d_kv=16, num_layers=2, num_heads=2))  # the tiny variant's widths
PEER = "text encoders, transformers eager bf16 (peer)"
CALIB_PAIRS, HELD_OUT = 16, 3


def tiny_config() -> VariantConfig:
    """The tiny Large variant (context width 96 = TINY's T5 width, 77 + 256 tokens)."""
    from sd35trt.export.tiny_model import TINY_TRANSFORMERS

    return VariantConfig("tiny", "large", TINY_TRANSFORMERS["large"])


def prompt_sets(config: VariantConfig, tokenizers: str | Path | None, device: str):
    """(calibration T5 ids [[2, T]...], held-out {clip_l, clip_g, t5: ids [2, L]} x HELD_OUT) from the
    calibration prompts and a checkpoint's tokenizers, or seeded random ids without them."""
    n_t5, n_clip = config.max_sequence_length, config.clip_tokens
    if tokenizers is None:
        g = torch.Generator().manual_seed(10)
        calib = [torch.randint(0, 30000, (2, n_t5), generator=g).to(device) for _ in range(CALIB_PAIRS)]
        held = [{k: torch.randint(0, 30000, (2, n), generator=g).to(device)
                 for k, n in (("clip_l", n_clip), ("clip_g", n_clip), ("t5", n_t5))} for _ in range(HELD_OUT)]
        return calib, held
    from sd35trt.export.calibrate import CALIB_DIR, read_prompts, t5_calibration_ids
    from sd35trt.runtime.text import load_tokenizers

    tl, tg, t5 = load_tokenizers(tokenizers)
    calib, _ = t5_calibration_ids(t5, config, CALIB_PAIRS, device)
    lines = [p for p in (CALIB_DIR / "prompts.txt").read_text(encoding="utf-8").splitlines() if p.strip()]
    _, negatives = read_prompts(1)
    pairs = [[negatives[-1 - i], lines[-1 - i]] for i in range(HELD_OUT)]  # never among the first 16
    held = [{"clip_l": tl(p, n_clip).to(device), "clip_g": tg(p, n_clip).to(device), "t5": t5(p, n_t5).to(device)}
            for p in pairs]
    return calib, held


def encoder(config: VariantConfig, modules: dict, ids: dict, device: str) -> Callable[[], torch.Tensor]:
    """() -> context [2, 77+T, 4096] of `modules` through the torch backend's component callables
    and the pipeline's prompt assembly (runtime.text.PromptEncoder)."""
    from sd35trt.runtime.backends.torch_backend import TorchBackend
    from sd35trt.runtime.text import PromptEncoder

    backend = TorchBackend.from_modules(modules, torch.device(device), torch.bfloat16)
    enc = PromptEncoder(config, tuple(_Pretokenized(ids[k]) for k in ("clip_l", "clip_g", "t5")), backend)
    n = ids["t5"].shape[1]
    return lambda: enc(["", ""], ["", ""], ["", ""], n)[0]


def _weights_gib(modules: dict) -> float:
    seen, total = set(), 0
    for m in modules.values():
        for t in list(m.parameters()) + list(m.buffers()):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return round(total / 2**30, 2)


def configurations(enc: dict, calib: list, compile_args: dict) -> dict[str, dict]:
    """name -> component modules: the peer, ours (the backend's conversion, compiled and eager) and
    the previous product (weight-only FP8 T5). The CLIP weights are shared by all (wrappers differ)."""
    from sd35trt.runtime.models.fp8 import fp8_weights_only
    from sd35trt.runtime.models.fp8_text import calibrate_linears, compile_text_encoders, t5_precision
    from sd35trt.runtime.models.loader import ClipGraph, T5Graph

    def graphs(t5) -> dict:
        return {"clip_l": ClipGraph(enc["clip_l"]), "clip_g": ClipGraph(enc["clip_g"]), "t5": T5Graph(t5)}

    t0 = time.perf_counter()
    fp8_t5 = copy.deepcopy(enc["t5"])
    amax = calibrate_linears(fp8_t5, calib, lambda ids: fp8_t5(ids))  # export.calibrate.calibrate_t5's statistic
    print(f"T5 calibration over {len(calib)} pairs: {time.perf_counter() - t0:.1f} s", flush=True)
    ours = graphs(fp8_t5)
    if t5_precision(ours["t5"], amax) != "fp8-gemms":
        raise RuntimeError("the T5 calibration did not give FP8 GEMMs")
    eager = graphs(fp8_t5)  # other wrappers of the same converted T5: stay eager
    compile_text_encoders(ours, **compile_args)
    return {PEER: graphs(enc["t5"]),
            "ours: T5 FP8 GEMMs, T5 + CLIPs compiled (torch-fp8 compile)": ours,
            "ours: T5 FP8 GEMMs, eager": eager,
            "previous: T5 weight-only FP8, eager": graphs(fp8_weights_only(copy.deepcopy(enc["t5"])))}


def activation_peak(fn: Callable[[], torch.Tensor], device: str) -> float:
    """GiB one call allocates at most above what is allocated before it (weights of every
    configuration stay resident); 0 off CUDA."""
    if device != "cuda":
        return 0.0
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)




def interleaved(fns: dict[str, Callable[[], torch.Tensor]], rounds: int, iters: int) -> dict[str, list[list[float]]]:
    """name -> per-round lists of call times (ms); the order rotates every round, 2 warm-ups each."""
    names, times = list(fns), {n: [] for n in fns}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(2):
                fns[name]()
            times[name].append(timed_calls(fns[name], iters))
    return times


def bench_text(runner: Runner, variant: str = "sd3.5-large", tokenizers: str | Path | None = None,
               rounds: int = 9, iters: int = 10, tiny: bool = False, compile_args: dict | None = None) -> None:
    """The rows described above into `runner` (JSON as it goes) and a table on stdout. `tiny`: the
    bench's own CPU check (tiny widths, real sequence lengths); `compile_args`: torch.compile's
    (default: inductor, as the backend)."""
    config, device = (tiny_config() if tiny else VARIANTS[variant]), "cpu" if tiny else "cuda"
    if tiny:  # the CPU's FP8 GEMMs (torch._scaled_mm) are a slow reference: one short round
        rounds, iters = 1, 2
    enc = text_encoders(TINY if tiny else (CLIP_L, CLIP_G, T5_XXL), device)
    calib, held = prompt_sets(config, tokenizers, device)
    with torch.no_grad():
        confs = configurations(enc, calib, compile_args or {})
        free()
        fns = {name: encoder(config, mods, held[0], device) for name, mods in confs.items()}
        first = {}
        for name, fn in fns.items():  # first calls: the compiled one's includes its compile
            sync()
            t = time.perf_counter()
            fn()
            sync()
            first[name] = round(time.perf_counter() - t, 2)
            print(f"first call {name}: {first[name]} s", flush=True)
        peaks = {name: activation_peak(fn, device) for name, fn in fns.items()}
        refs = [encoder(config, confs[PEER], ids, device)().clone() for ids in held]
        outs = {name: [encoder(config, mods, ids, device)().clone() for ids in held]
                for name, mods in confs.items() if name != PEER}
        n_clip = config.clip_tokens  # the context's T5 part: [2, T, 4096] after the CLIP tokens
        cos = {name: [round(cosine(o, r), 6) for o, r in zip(got, refs)] for name, got in outs.items()}
        t5_cos = {name: [round(cosine(o[:, n_clip:], r[:, n_clip:]), 6) for o, r in zip(got, refs)]
                  for name, got in outs.items()}
        partial = [{"name": n, "first_call_s": first[n], "held_out_cos": cos.get(n), "t5_part_cos": t5_cos.get(n),
                    "partial": "no timed rounds yet"} for n in fns]
        runner.out.parent.mkdir(parents=True, exist_ok=True)
        runner.out.write_text(json.dumps(partial, indent=1))  # kept if the rounds do not finish
        print(json.dumps(partial), flush=True)
        times = interleaved(fns, rounds, iters)
    peer_rounds = [statistics.median(t) for t in times[PEER]]
    for name in fns:
        flat = [x for t in times[name] for x in t]
        per_round = [statistics.median(t) for t in times[name]]
        ratio = statistics.median(o / p for o, p in zip(per_round, peer_rounds))
        row = {"name": name, "step_ms": round(statistics.median(flat), 2), "first_call_s": first[name],
               "peak_gib": peaks[name], "activation_peak_gib": peaks[name], "weights_gib": _weights_gib(confs[name]),
               "round_median_ms": [round(x, 2) for x in per_round], "time_vs_peer": round(ratio, 3),
               "calls": len(flat), "rounds": rounds, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "prompts": f"calib_prompts/ via {tokenizers}" if tokenizers else "seeded ids"}
        if name in cos:
            row.update(cos_vs_bf16=min(cos[name]), held_out_cos=cos[name], t5_part_cos=t5_cos[name])
        if "compiled" in name:
            row["compile_s"] = first[name]
        runner.rows.append(row)
    runner.out.write_text(json.dumps(runner.rows, indent=1))
    print(table(runner.rows))


def table(rows: list[dict]) -> str:
    lines = [f"{'text encoders, one CFG pair':<62} {'ms':>8} {'time/peer':>9} {'1st call s':>10} "
             f"{'weights GiB':>11} {'ctx cos min':>11} {'T5 cos min':>10}"]
    for r in rows:
        t5 = min(r["t5_part_cos"]) if "t5_part_cos" in r else ""
        lines.append(f"{r['name']:<62} {r['step_ms']:>8.2f} {r['time_vs_peer']:>8.3f}x {r['first_call_s']:>10.2f} "
                     f"{r['weights_gib']:>11.2f} {r.get('cos_vs_bf16', ''):>11} {t5:>10}")
    return "\n".join(lines)
