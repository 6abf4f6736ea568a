"""Text encoders on the GPU: the peer (transformers BF16 eager CLIP-L, CLIP-G, T5-XXL) vs ours with
T5-XXL's GEMMs in real FP8 (static scales calibrated over calib_prompts/), compiled, CLIPs compiled.

Run on the GPU host: `bash tools/gpu_run.sh tools/text_fp8_probe.py $OUT/text.json TOKENIZER_DIR`.
Random weights at real shapes (sd35trt/bench_e2e.py's encoders); the prompts are tokenized by the
tokenizers in TOKENIZER_DIR (a checkpoint or engine set folder): calibration over the first 16
calib_prompts/ pairs (negative; positive), measured on held-out prompts. One CFG pair per call, as
the pipeline encodes; the context cosine is against the peer's context of the same prompts.
"""

import json
import sys
import time
from pathlib import Path

import torch

from sd35trt.bench import Runner, cosine, free
from sd35trt.bench_e2e import prompt_encoder, text_encoders
from sd35trt.runtime.config import VARIANTS
from sd35trt.runtime.models.fp8 import fp8_weights_only
from sd35trt.runtime.models.fp8_text import calibrate_linears, t5_to_fp8
from sd35trt.runtime.text import load_tokenizers

CALIB = Path(__file__).resolve().parent.parent / "calib_prompts"


def ids_for(toks, config, prompts, negatives):
    tl, tg, t5 = toks
    return {"clip_l": tl(negatives + prompts, config.clip_tokens).cuda(), "clip_g": tg(negatives + prompts, config.clip_tokens).cuda(),
            "t5": t5(negatives + prompts, config.max_sequence_length).cuda()}


class Cloned(torch.nn.Module):
    """A compiled (CUDA-graph) encoder whose outputs are copied out of the graph's pool, so the
    pipeline may hold CLIP-L's output while CLIP-G and T5 replay."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        out = self.fn(*args)
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()


def graph_encoder(config, graphs, ids):
    """bench_e2e.prompt_encoder over component graphs already made (compiled or not)."""
    from sd35trt.bench_e2e import _Pretokenized
    from sd35trt.runtime.backends.torch_backend import TorchBackend
    from sd35trt.runtime.text import PromptEncoder

    backend = TorchBackend.from_modules(graphs, ids["clip_l"].device, torch.bfloat16)
    encoder = PromptEncoder(config, tuple(_Pretokenized(ids[k]) for k in ("clip_l", "clip_g", "t5")), backend)
    return lambda: encoder(["", ""], ["", ""], ["", ""], ids["t5"].shape[1])


def compiled_graphs(enc, mode):
    from sd35trt.runtime.models.loader import ClipGraph, T5Graph

    graphs = {"clip_l": ClipGraph(enc["clip_l"]), "clip_g": ClipGraph(enc["clip_g"]), "t5": T5Graph(enc["t5"])}
    if mode == "eager":
        return graphs
    return {k: Cloned(torch.compile(g, mode=None if mode == "default" else mode)) for k, g in graphs.items()}


def main() -> None:
    out, tok_dir = Path(sys.argv[1]), sys.argv[2]
    config, runner = VARIANTS["sd3.5-large"], Runner(out)
    toks = load_tokenizers(tok_dir)
    lines = [x.strip() for x in (CALIB / "prompts.txt").read_text().splitlines() if x.strip()]
    negs = [x.strip() for x in (CALIB / "negative.txt").read_text().splitlines() if x.strip()]
    held = ids_for(toks, config, [lines[-1]], [negs[-1]])
    enc = text_encoders()
    with torch.no_grad():
        peer = prompt_encoder(config, enc, held)
        ref = runner.record("text encoders, transformers eager bf16 (peer)", lambda: peer()[0])
        ref_b = {}
        for i in range(3):  # two more held-out pairs for the cosine
            ids = ids_for(toks, config, [lines[-2 - i]], [negs[(i + 1) % len(negs)]])
            ref_b[i] = (ids, prompt_encoder(config, enc, ids)()[0].clone())
        t5 = enc["t5"]
        t0 = time.perf_counter()
        calib = [ids_for(toks, config, [p], [negs[i % len(negs)]])["t5"] for i, p in enumerate(lines[:16])]
        amax = calibrate_linears(t5, calib, lambda ids: t5(ids))
        print(f"T5 calibration over {len(calib)} pairs: {time.perf_counter() - t0:.1f} s", flush=True)
        import copy

        variants = {}
        variants["t5 weight-only fp8"] = fp8_weights_only(copy.deepcopy(t5))
        variants["t5 fp8 gemms (wo weight-only)"] = t5_to_fp8(copy.deepcopy(t5), amax)
        del enc["t5"], t5
        free()
        for name, model in variants.items():
            for mode in ("eager",) if name.startswith("t5 weight-only") else ("eager", "default", "reduce-overhead"):
                torch._dynamo.reset()
                graphs = compiled_graphs(dict(enc, t5=model), mode)
                encode = graph_encoder(config, graphs, held)
                t = time.perf_counter()
                try:
                    runner.record(f"ours: {name}, {mode}{' (t5 + clips compiled)' if mode != 'eager' else ''}",
                                  lambda: encode()[0], ref)
                    row = runner.rows[-1]
                    row["setup_s"] = round(time.perf_counter() - t, 1)
                    row["held_out_cos"] = [round(cosine(graph_encoder(config, graphs, ids)()[0], r), 5)
                                           for ids, r in ref_b.values()]
                except Exception as exc:  # a compile failure is a result too
                    print(f"{name} {mode}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                print(json.dumps(row), flush=True)
                out.write_text(json.dumps(runner.rows, indent=1))
    print(runner.table("text encoders, transformers eager bf16 (peer)"))


if __name__ == "__main__":
    main()
