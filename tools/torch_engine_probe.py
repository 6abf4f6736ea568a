"""Build a torch-fp8 engine set on the GPU host, then time the first image of a fresh process that
has only the set (no compile cache).

Run there: `bash tools/gpu_run.sh tools/torch_engine_probe.py $OUT/engine.json TINY_MODEL [variant]`
(TINY_MODEL: any checkpoint folder whose tokenizers the set carries; `sd35trt tiny-model` makes one).
  build: random weights at the variant's real shapes (seeded, as `sd35trt bench` makes them), the
         MMDiT calibrated with max statistics, `export.torch_engines.build_torch_set` (its warm-up is
         the 28-step default-size image below, whose pixels are kept);
  fresh: a new process with empty inductor / Triton / user cache folders, after the set's files
         are evicted from the page cache: `Pipeline.from_pretrained(set)` and the same image,
         timed from the process's start; then a second image. The two images are compared.
         `--page-cache-warm`: once more, the set's files still in the page cache (empty caches).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = dict(prompt="a lighthouse on a cliff at golden hour", negative_prompt="blurry", num_inference_steps=28,
              output_type="np", progress=False)


def build(set_dir: Path, tiny: str, variant: str, work: Path) -> dict:
    import numpy as np
    import torch

    from sd35trt.bench import EXCLUDE, random_init, random_mmdit, step_inputs
    from sd35trt.bench_e2e import text_encoders
    from sd35trt.export.torch_engines import build_torch_set
    from sd35trt.runtime.checkpoint import Checkpoint
    from sd35trt.runtime.config import VARIANTS
    from sd35trt.runtime.models.fp8 import max_calibrate
    from sd35trt.runtime.models.loader import ClipGraph, T5Graph
    from sd35trt.runtime.models.vae import VaeDecoder

    config = VARIANTS[variant]
    t0 = time.perf_counter()
    reused = reusable(set_dir)
    if reused:
        return reused
    with torch.no_grad():
        mmdit = random_mmdit(config, torch.bfloat16, "cuda")
        args = step_inputs(config, config.default_size, 1, "cuda", torch.bfloat16)
        amax = max_calibrate(mmdit, lambda m: m(*args), EXCLUDE)
        with torch.device("meta"):
            vae = VaeDecoder(config.vae)
        enc = text_encoders()
        modules = {"clip_l": ClipGraph(enc["clip_l"]), "clip_g": ClipGraph(enc["clip_g"]), "t5": T5Graph(enc["t5"]),
                   "transformer": mmdit, "vae_decoder": random_init(vae, "cuda", 7)}
    made = time.perf_counter() - t0
    images = []

    def warmup(pipe) -> None:  # the image the fresh process makes, kept for the comparison
        t = time.perf_counter()
        images.append(pipe(**PROMPT, generator=torch.Generator().manual_seed(0)).images)
        print(f"build warm-up image (compiles): {time.perf_counter() - t:.1f} s", flush=True)

    scope, fallback = ("blocks", None) if "--blocks" in os.environ.get("PROBE_FLAGS", "") else ("model", None)
    try:
        m = build_torch_set(dict(modules), amax, config, Checkpoint.open(tiny), set_dir, gpu="sm90",
                            source=f"random:{variant}", warmup=warmup, compile_scope=scope)
    except Exception as exc:  # regional compile failed here: warm the written set up as one graph instead
        if scope == "model":
            raise
        from dataclasses import replace

        from sd35trt.export.torch_engines import warm_set
        from sd35trt.runtime.engine_manifest import EngineManifest
        from sd35trt.runtime.torch_engine_set import installed_versions

        fallback = f"{type(exc).__name__}: {str(exc)[:500]}"
        print(f"compile_scope=blocks failed ({fallback}); warming the set up with compile_scope=model", flush=True)
        torch._dynamo.reset()
        images.clear()
        m = EngineManifest.load(set_dir)
        tf = m.components["transformer"]
        m = replace(m, components={**m.components, "transformer": replace(tf, flags={**tf.flags, "compile_scope": "model"})})
        m.save(set_dir)
        m = warm_set(m, set_dir, warmup, installed_versions(), {"fallback": True})
    np.save(set_dir.parent / "ref.npy", images[0])
    sizes = {c: round(e.bytes / 2**30, 3) for c, e in m.components.items()}
    return {"compile_scope": scope, "blocks_failed": fallback, "random_modules_s": round(made, 1), "build_s": round(time.perf_counter() - t0, 1),
            "timings": m.components["compile_cache"].flags["timings"], "gib": sizes,
            "attention": m.components["transformer"].flags["attention"],
            "versions": {k: v for k, v in m.components["compile_cache"].flags.items() if k.endswith("version")}}


def reusable(set_dir: Path) -> dict | None:
    """The set a previous call built on this (still warm) machine, if it passes the runtime's check."""
    from sd35trt.runtime.engine_manifest import EngineManifest, device_cc
    from sd35trt.runtime.torch_engine_set import check_set, installed_versions

    if not (set_dir.parent / "ref.npy").is_file():
        return None
    try:
        m = EngineManifest.load(set_dir)
        check_set(m, set_dir, device_cc(), installed_versions())
        for e in m.components.values():  # weights are hashed as they load; here, before reusing
            from sd35trt.runtime.set_reader import chunk_hashes

            if chunk_hashes(set_dir / e.file) != e.flags["sha256_chunks"]:
                return None
    except Exception as exc:  # any refusal: build afresh
        print(f"previous set not reused: {exc}", flush=True)
        return None
    return {"reused": str(set_dir), "timings": m.components["compile_cache"].flags["timings"]}


def fresh(set_dir: Path, work: Path, t_spawn: float) -> dict:
    t_start = time.time()
    import numpy as np
    import torch

    from sd35trt.runtime import Pipeline

    t_import = time.time()
    pipe = Pipeline.from_pretrained(set_dir)
    t_loaded = time.time()
    img = pipe(**PROMPT, generator=torch.Generator().manual_seed(0)).images
    t_first = time.time()
    pipe(**PROMPT, generator=torch.Generator().manual_seed(0))
    t_second = time.time()
    np.save(work / "fresh.npy", img)
    b = pipe.backend
    from sd35trt.bench import step_inputs, time_cuda

    args = step_inputs(pipe.config, pipe.config.default_size, 1, "cuda", torch.float32)  # as the pipeline calls it
    step_ms = round(time_cuda(lambda: b.transformer(*args)), 2)
    from torch._dynamo.utils import compile_times

    print("compile_times (first image):\n" + str(compile_times(repr="str", aggregate=True))[:3000], flush=True)
    return {"spawn_to_python_s": round(t_start - t_spawn, 2), "imports_s": round(t_import - t_start, 2),
            "from_pretrained_s": round(t_loaded - t_import, 2), "load": {k: round(v, 2) for k, v in b.timings.items()},
            "first_image_s": round(t_first - t_loaded, 2), "spawn_to_first_image_s": round(t_first - t_spawn, 2),
            "second_image_s": round(t_second - t_first, 2), "step_ms": step_ms, "attention": b.attention.name, "backend": type(b).__name__,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def evict(folder: Path) -> str:
    """Drop the set's files from the page cache (a fresh machine reads them from disk)."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "page cache dropped (drop_caches=3)"
    except OSError as exc:
        return f"set files evicted (fadvise); drop_caches failed: {exc}"


def run_child(mode: str, argv: list[str], work: Path, env_dirs: str) -> dict:
    cache = work / env_dirs
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"),
               XDG_CACHE_HOME=str(cache / "xdg"), CUTE_DSL_CACHE_DIR=str(cache / "cute"),
               PROBE_FLAGS=" ".join(a for a in sys.argv if a.startswith("--")))  # the child's argv is its own
    t = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", mode, *argv, str(t)], env=env, capture_output=True,
                          text=True)
    sys.stdout.write(proc.stdout[-6000:])
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    row = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-3000:]}
    row.update(mode=mode, wall_s=round(time.time() - t, 1))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    if sys.argv[1] == "--child":
        mode, rest = sys.argv[2], sys.argv[3:]
        if mode == "build":
            res = build(Path(rest[0]), rest[1], rest[2], Path(rest[3]))
        else:
            res = fresh(Path(rest[0]), Path(rest[1]), float(rest[2]))
        print("RESULT " + json.dumps(res), flush=True)
        return
    out, tiny = Path(sys.argv[1]), sys.argv[2]
    variant = sys.argv[3] if len(sys.argv) > 3 and not sys.argv[3].startswith("--") else "sd3.5-large"
    work = Path(tempfile.mkdtemp(prefix="tset-"))
    set_dir = Path("/tmp/engines") / f"{variant}-fp8-sm90-torch"
    rows = [run_child("build", [str(set_dir), tiny, variant, str(work)], work, "build-caches")]
    out.write_text(json.dumps(rows, indent=1))
    if "error" in rows[0]:
        return
    rows.append({"evict": evict(set_dir), "set_gib": round(sum(p.stat().st_size for p in set_dir.rglob("*")
                                                                 if p.is_file()) / 2**30, 2)})
    rows.append(run_child("fresh", [str(set_dir), str(work)], work, "fresh-caches"))
    if "--page-cache-warm" in sys.argv and "error" not in rows[-1]:  # a replica restarting on the same host
        rows.append(run_child("fresh", [str(set_dir), str(work)], work, "fresh-caches-2"))
        rows[-1]["mode"] = "fresh, set in the page cache"
    if "error" not in rows[-1]:
        import numpy as np

        a, b = np.load(set_dir.parent / "ref.npy").astype("float64"), np.load(work / "fresh.npy").astype("float64")
        cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
        mse = float(((a - b) ** 2).mean())
        rows.append({"fresh_vs_build_image": {"equal": bool((a == b).all()), "max_abs": float(abs(a - b).max()),
                                              "cosine": round(cos, 6), "psnr_db": round(10 * np.log10(1 / max(mse, 1e-20)), 2)}})
        print(json.dumps(rows[-1]))
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
