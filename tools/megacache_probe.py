"""Does torch's mega-cache (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`) carry the
compiled torch-fp8 MMDiT, FA4 custom op included, into a fresh process with empty caches?

Run on the GPU host: `bash tools/gpu_run.sh tools/megacache_probe.py $OUT/megacache.json [variant]`.
Two child processes, each with its own empty inductor and Triton cache folders:
  cold: build the random-weight FP8 MMDiT (+fast +gelu, FA4 core when it imports), compile it as the
        torch-fp8 backend does (reduce-overhead, fullgraph), time the first step, save the artifacts;
  mega: the same, after `load_cache_artifacts` of those bytes; the output must equal cold's.
"""

import json
import os
import subprocess
import sys
import tempfile
import time


def child(mode: str, variant: str, work: str) -> dict:
    t_start = time.perf_counter()
    import torch

    from sd35trt.bench import EXCLUDE, random_mmdit, step_inputs, time_cuda
    from sd35trt.runtime.backends.torch_fp8 import compile_options
    from sd35trt.runtime.config import VARIANTS
    from sd35trt.runtime.models.flash_attention import choose_attention, set_attention_core
    from sd35trt.runtime.models.fp8 import max_calibrate, to_fp8
    from sd35trt.runtime.models.mmdit import use_sigmoid_gelu

    out = {"mode": mode}
    if mode == "mega":
        with open(os.path.join(work, "mega.bin"), "rb") as f:
            blob = f.read()
        t0 = time.perf_counter()
        info = torch.compiler.load_cache_artifacts(blob)
        out["load_s"] = round(time.perf_counter() - t0, 2)
        out["loaded"] = str(info)[:400]
    config = VARIANTS[variant]
    with torch.no_grad():
        model = random_mmdit(config, torch.bfloat16, "cuda")
        args = step_inputs(config, config.default_size, 1, "cuda", torch.bfloat16)
        m8 = to_fp8(model, max_calibrate(model, lambda m: m(*args), EXCLUDE), fast_accum=True)
        use_sigmoid_gelu(m8)
        choice = choose_attention("cuda", torch.bfloat16)
        set_attention_core(m8, choice.core)
        out["attention"] = choice.name
        fn = torch.compile(m8, fullgraph=True, options=compile_options("reduce-overhead"))
        torch.cuda.synchronize()
        out["ready_s"] = round(time.perf_counter() - t_start, 1)  # imports + model + calibration
        t0 = time.perf_counter()
        with choice.context():
            y = fn(*args).clone()
            torch.cuda.synchronize()
            out["first_step_s"] = round(time.perf_counter() - t0, 1)
            out["step_ms"] = round(time_cuda(lambda: fn(*args)), 2)
    out["process_to_first_step_s"] = round(time.perf_counter() - t_start, 1)
    torch.save(y.cpu(), os.path.join(work, f"{mode}.pt"))
    if mode == "cold":
        t0 = time.perf_counter()
        blob, info = torch.compiler.save_cache_artifacts()
        out["save_s"] = round(time.perf_counter() - t0, 2)
        out["artifact_mib"] = round(len(blob) / 2**20, 2)
        out["saved"] = str(info)[:400]
        with open(os.path.join(work, "mega.bin"), "wb") as f:
            f.write(blob)
    return out


def main() -> None:
    if sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(sys.argv[2], sys.argv[3], sys.argv[4])), flush=True)
        return
    out_path, variant = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "sd3.5-large"
    work = tempfile.mkdtemp(prefix="mega-")
    rows = []
    for mode in ("cold", "mega"):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(work, f"{mode}-inductor"),
                   TRITON_CACHE_DIR=os.path.join(work, f"{mode}-triton"))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", mode, variant, work], env=env,
                              capture_output=True, text=True)
        wall = round(time.perf_counter() - t0, 1)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        row = json.loads(line[-1][7:]) if line else {"mode": mode, "error": proc.stderr[-1500:]}
        row["wall_s"] = wall
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)
        if "error" in row:
            break
    if all("error" not in r for r in rows):
        import torch

        a, b = (torch.load(os.path.join(work, f"{m}.pt")) for m in ("cold", "mega"))
        a64, b64 = a.double().flatten(), b.double().flatten()
        rows.append({"mega_equals_cold": bool(torch.equal(a, b)), "max_abs": float((a64 - b64).abs().max()),
                     "cosine": float(torch.nn.functional.cosine_similarity(a64, b64, dim=0)),
                     "rel_l2": float((a64 - b64).norm() / b64.norm())})
        print(json.dumps(rows[-1]))
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
