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
Flags (argv, or the PROBE_FLAGS environment variable; both reach the build child):
  --blocks          the set's MMDiT compiled per joint block (compile_scope="blocks") instead of whole;
  --deadline=S      skip the page-cache-warm process once S seconds have gone since the probe started;
  --no-fallback     a failed `--blocks` build is an error (not warmed up again as one graph);
  --cpu-tiny        a dry run of this probe's own code on the CPU: the set written from TINY_MODEL's own
                    weights (write_set, no compile: that needs the GPU), fresh processes loading it with
                    compile=False, a 64x64 3-step image; proves the arguments, children and breakdown.
Each fresh process prints a breakdown (`breakdown_s`) whose parts sum to spawn -> first image done:
imports, from_pretrained's parts, then the first image per component call (synchronized), the rest.
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


def cpu_tiny() -> bool:
    return "--cpu-tiny" in probe_flags()


def prompt() -> dict:
    return {**PROMPT, "height": 64, "width": 64, "num_inference_steps": 3} if cpu_tiny() else PROMPT


def build_cpu(set_dir: Path, tiny: str) -> dict:
    """--cpu-tiny: the tiny checkpoint's own modules written as a set (no compile), its image kept."""
    import numpy as np
    import torch

    from sd35trt.export.torch_engines import write_set
    from sd35trt.runtime import Pipeline
    from sd35trt.runtime.checkpoint import Checkpoint
    from sd35trt.runtime.components import RUNTIME
    from sd35trt.runtime.engine_manifest import BuildArgs
    from sd35trt.runtime.models.fp8 import HIGH_PRECISION, max_calibrate
    from sd35trt.runtime.models.loader import load_modules
    from sd35trt.runtime.torch_engine_set import installed_versions

    t0 = time.perf_counter()
    ckpt, scope = Checkpoint.open(tiny), "blocks" if "--blocks" in probe_flags() else "model"
    names = [c.name for c in RUNTIME if c.name != "vae_encoder"]
    modules = load_modules(ckpt, names, torch.device("cpu"), torch.bfloat16)
    config, g = ckpt.config, torch.Generator().manual_seed(0)
    lat = torch.randn(config.latent_shape(2, 64, 64), generator=g).bfloat16()  # [2, 16, 8, 8]
    ctx = torch.randn(2, config.text_tokens(), config.joint_dim, generator=g).bfloat16()  # [2, 77+T, joint]
    pooled = torch.randn(2, config.pooled_dim, generator=g).bfloat16()  # [2, pooled]
    amax = max_calibrate(modules["transformer"], lambda m: m(lat, torch.full((2,), 500.0), ctx, pooled), HIGH_PRECISION)
    build = BuildArgs(onnx=tiny, out=str(set_dir), gpu="sm90", flavor="torch-fp8", dynamic=False, batch=[1, 1])
    m = write_set(modules, amax, config, ckpt, set_dir, gpu="sm90", build=build, compile="reduce-overhead",
                  attention="flash-attn-4", versions=installed_versions(), compile_scope=scope)
    pipe = Pipeline.from_pretrained(set_dir, device="cpu", compile=False)
    np.save(set_dir.parent / "ref.npy", pipe(**prompt(), generator=torch.Generator().manual_seed(0)).images)
    return {"compile_scope": m.components["transformer"].flags["compile_scope"], "blocks_failed": None,
            "build_s": round(time.perf_counter() - t0, 1), "timings": {}}


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
        images.append(pipe(**prompt(), generator=torch.Generator().manual_seed(0)).images)
        print(f"build warm-up image (compiles): {time.perf_counter() - t:.1f} s", flush=True)

    scope, fallback = ("blocks", None) if "--blocks" in probe_flags() else ("model", None)
    try:
        m = build_torch_set(dict(modules), amax, config, Checkpoint.open(tiny), set_dir, gpu="sm90",
                            source=f"random:{variant}", warmup=warmup, compile_scope=scope)
    except Exception as exc:  # regional compile failed here: warm the written set up as one graph instead
        if scope == "model" or "--no-fallback" in probe_flags():
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


def probe_flags(argv: list[str] | None = None) -> list[str]:
    """The probe's flags: PROBE_FLAGS (environment) and the `--` arguments of `argv`, in that order."""
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ.get("PROBE_FLAGS", "").split()
    return list(dict.fromkeys(env + [a for a in argv if a.startswith("--") and a != "--child"]))


def flag_value(name: str, flags: list[str]) -> float | None:
    vals = [f.split("=", 1)[1] for f in flags if f.startswith(name + "=")]
    return float(vals[-1]) if vals else None


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


class Timed:
    """A backend component callable that records each call's seconds (synchronized: a breakdown)."""

    def __init__(self, call, sync) -> None:
        self.call, self.sync, self.times = call, sync, []

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.call(*args, **kwargs)
        self.sync()
        self.times.append(time.perf_counter() - t)
        return out

    def __getattr__(self, name):
        return getattr(self.call, name)


def timed_calls(backend, sync) -> dict:
    """Wrap the backend's component callables in `Timed` (the pipeline reads them per call)."""
    wrapped = {}
    for name in ("clip_l", "clip_g", "t5", "transformer", "vae_decoder"):
        if getattr(backend, name, None) is not None:
            wrapped[name] = Timed(getattr(backend, name), sync)
            setattr(backend, name, wrapped[name])
    return wrapped


def image_breakdown(wrapped: dict, total: float) -> dict:
    """Seconds of one image per component call; the MMDiT's first two calls apart (trace + compile
    artifacts + FA4 JIT + CUDA-graph warm-up, then the graph's recording); `other`: the rest."""
    out = {}
    for name, w in wrapped.items():
        if name == "transformer" and len(w.times) > 2:
            out.update(transformer_call1=w.times[0], transformer_call2=w.times[1],
                       transformer_rest=sum(w.times[2:]), transformer_calls=len(w.times))
        else:
            out[name] = sum(w.times)
    out["other"] = total - sum(v for k, v in out.items() if k != "transformer_calls")
    return {k: (v if isinstance(v, int) else round(v, 3)) for k, v in out.items()}


def backend_init_timer():
    """Time TorchFP8SetBackend.__init__ (from_pretrained = the pipeline's own work + this)."""
    from sd35trt.runtime.backends.torch_fp8_set import TorchFP8SetBackend

    seen, init = {}, TorchFP8SetBackend.__init__

    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        init(self, *args, **kwargs)
        seen["backend_init_s"] = time.perf_counter() - t

    TorchFP8SetBackend.__init__ = timed
    return seen


def fresh(set_dir: Path, work: Path, t_spawn: float) -> dict:
    t_start = time.time()
    import numpy as np
    import torch

    from sd35trt.runtime import Pipeline

    t_import = time.time()
    seen = backend_init_timer()
    cpu = cpu_tiny()
    pipe = Pipeline.from_pretrained(set_dir, **(dict(device="cpu", compile=False) if cpu else {}))
    t_loaded = time.time()
    b = pipe.backend
    wrapped = timed_calls(b, (lambda: None) if cpu else torch.cuda.synchronize)
    img = pipe(**prompt(), generator=torch.Generator().manual_seed(0)).images
    t_first = time.time()
    first = image_breakdown(wrapped, t_first - t_loaded)
    for w in wrapped.values():
        w.times.clear()
    pipe(**prompt(), generator=torch.Generator().manual_seed(0))
    t_second = time.time()
    second = image_breakdown(wrapped, t_second - t_first)
    np.save(work / "fresh.npy", img)
    from sd35trt.bench import step_inputs, time_cuda

    run = wrapped["transformer"].call  # unsynchronized: the backend's own callable
    size, dev = (64, "cpu") if cpu else (pipe.config.default_size, "cuda")
    args = step_inputs(pipe.config, size, 1, dev, torch.float32)  # as the pipeline calls it
    time_cuda = time_cpu if cpu else time_cuda
    step_ms = round(time_cuda(lambda: run(*args)), 2)
    bf16 = [a if a.dim() == 1 else a.to(torch.bfloat16) for a in args]
    step_bf16_ms = round(time_cuda(lambda: run(*bf16)), 2)  # no cast in the call (as `sd35trt bench` times it)
    from torch._dynamo.utils import compile_times, counters

    print("compile_times (both images):\n" + str(compile_times(repr="str", aggregate=True))[:3000], flush=True)
    load = {k: round(v, 3) for k, v in b.timings.items()}
    parts = {k: v for k, v in load.items() if k != "weights_s"}  # weights_s spans the reads: the others overlap it
    init = seen.get("backend_init_s", 0.0)
    fp = t_loaded - t_import
    breakdown = {"spawn_to_python": t_start - t_spawn, "imports": t_import - t_start,
                 **{f"from_pretrained.{k.removesuffix('_s')}": v for k, v in parts.items()},
                 "from_pretrained.backend_other": init - sum(parts.values()),
                 "from_pretrained.pipeline_other": fp - init,
                 **{f"first_image.{k}": v for k, v in first.items() if k != "transformer_calls"}}
    breakdown = {k: round(v, 3) for k, v in breakdown.items()}
    total = t_first - t_spawn
    print("BREAKDOWN first image (s):\n" + "\n".join(f"  {k:36s} {v:8.3f}" for k, v in breakdown.items())
          + f"\n  {'sum':36s} {sum(breakdown.values()):8.3f}\n  {'spawn -> first image done':36s} {total:8.3f}",
          flush=True)
    return {"spawn_to_python_s": round(t_start - t_spawn, 2), "imports_s": round(t_import - t_start, 2),
            "from_pretrained_s": round(fp, 2), "load": load, "backend_init_s": round(init, 2),
            "first_image_s": round(t_first - t_loaded, 2), "spawn_to_first_image_s": round(total, 2),
            "breakdown_s": breakdown, "breakdown_sum_s": round(sum(breakdown.values()), 2),
            "first_image_calls": first, "second_image_calls": second,
            "second_image_s": round(t_second - t_first, 2), "step_ms": step_ms, "step_bf16_inputs_ms": step_bf16_ms,
            "compile_scope": b.manifest.components["transformer"].flags.get("compile_scope", "model"),
            "dynamo": {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles")},
            "attention": b.attention.name, "backend": type(b).__name__, "gemm": getattr(b, "gemm", None) and b.gemm.name,
            "quack_kernels_installed": getattr(b, "quack_kernels_installed", None),
            "peak_gib": 0.0 if cpu else round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def time_cpu(fn, warmup: int = 1, iters: int = 3) -> float:
    """--cpu-tiny: median milliseconds of `fn` (wall clock)."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def evict(folder: Path) -> str:
    """Drop the set's files from the page cache (a fresh machine reads them from disk)."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    if cpu_tiny():  # a dry run on a shared machine: leave its page cache alone
        return "set files evicted (fadvise); --cpu-tiny: no drop_caches"
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
               QUACK_CACHE_DIR=str(cache / "quack"),  # quack's .o cache (default /tmp/<user>/quack_cache)
               PROBE_FLAGS=" ".join(probe_flags()))  # the child's argv is its own
    t = time.time()
    err = work / f"{env_dirs}.stderr"
    with open(err, "w") as ferr:  # the child's stdout streams through (a timeout keeps what was printed)
        proc = subprocess.Popen([sys.executable, __file__, "--child", mode, *argv, str(t)], env=env,
                                stdout=subprocess.PIPE, stderr=ferr, text=True)
        lines = []
        for x in proc.stdout:
            if " DEBUG " not in x:
                sys.stdout.write(x)
            if x.startswith("RESULT "):
                lines.append(x)
        proc.wait()
    row = json.loads(lines[-1][7:]) if lines else {"error": err.read_text()[-3000:], "rc": proc.returncode}
    row.update(mode=mode, wall_s=round(time.time() - t, 1))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    if sys.argv[1] == "--child":
        mode, rest = sys.argv[2], sys.argv[3:]
        if mode == "build":
            res = (build_cpu(Path(rest[0]), rest[1]) if cpu_tiny() else
                   build(Path(rest[0]), rest[1], rest[2], Path(rest[3])))
        else:
            res = fresh(Path(rest[0]), Path(rest[1]), float(rest[2]))
        print("RESULT " + json.dumps(res), flush=True)
        return
    t_probe = time.time()
    out, tiny = Path(sys.argv[1]), sys.argv[2]
    variant = sys.argv[3] if len(sys.argv) > 3 and not sys.argv[3].startswith("--") else "sd3.5-large"
    work = Path(tempfile.mkdtemp(prefix="tset-"))
    set_dir = (work if cpu_tiny() else Path("/tmp")) / "engines" / f"{variant}-fp8-sm90-torch"
    rows = [run_child("build", [str(set_dir), tiny, variant, str(work)], work, "build-caches")]
    out.write_text(json.dumps(rows, indent=1))
    if "error" in rows[0]:
        return
    rows.append({"evict": evict(set_dir), "set_gib": round(sum(p.stat().st_size for p in set_dir.rglob("*")
                                                                 if p.is_file()) / 2**30, 2)})
    rows.append(run_child("fresh", [str(set_dir), str(work)], work, "fresh-caches"))
    out.write_text(json.dumps(rows, indent=1))
    deadline = flag_value("--deadline", probe_flags())
    late = deadline is not None and time.time() - t_probe > deadline
    if late:
        rows.append({"skipped": f"page-cache-warm process: {time.time() - t_probe:.0f} s gone, deadline {deadline} s"})
    if "--page-cache-warm" in probe_flags() and not late and "error" not in rows[-1]:  # a replica restarting on the same host
        rows.append(run_child("fresh", [str(set_dir), str(work)], work, "fresh-caches-2"))
        rows[-1]["mode"] = "fresh, set in the page cache"
        out.write_text(json.dumps(rows, indent=1))
    if (work / "fresh.npy").is_file():
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
