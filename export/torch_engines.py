"""`sd35trt build --flavor torch-fp8`: a checkpoint and its FP8 calibration -> a torch-fp8 engine
set (runtime/torch_engine_set.py: layout, and why the inductor artifacts).

The build runs on the GPU the set is for (compiled kernels are per architecture): it converts the
modules as the torch-fp8 backend runs them (FP8 MMDiT from the calibration, T5-XXL with FP8
GEMMs from T5's calibration beside it, made here when the folder has none), writes their state dicts, then loads the set back through the runtime's own
`Pipeline.from_pretrained(set)` (so the compiled graphs are exactly the ones a later process
asks for), generates one image per warm-up shape and saves torch's compile artifacts. Every file
is written atomically; the manifest is written last but once before the warm-up (with an empty
artifact file), so an interrupted build leaves a set that its own check refuses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..runtime.backends.fp8_fusions import check_fusions
from ..runtime.backends.torch_fp8_set import COMPILE_SCOPES
from ..runtime.checkpoint import Checkpoint
from ..runtime.config import VariantConfig
from ..runtime.engine_manifest import BuildArgs, EngineEntry, EngineManifest, EngineShapes, device_cc
from ..runtime.errors import InvalidInputError
from ..runtime.files import MANIFEST, atomic_write, remove_temporaries, sha256_file
from ..runtime.backends.torch_fp8_set import TEXT_EAGER
from ..runtime.torch_engine_set import CACHE, CALIBRATION, FLAVOR, file_name, installed_versions, save_cache
from ..runtime.set_reader import chunk_hashes
from ..runtime.torch_engine_set import save_state
from .artifacts import copy_tokenizers

# A warm-up: (pipeline) -> None, generating what the set should start warm for.
Warmup = Callable[[Any], None]


def default_warmup(config: VariantConfig) -> Warmup:
    """One image at the variant's default size and guidance, 2 steps (the compiled graphs do not
    depend on the step count)."""
    return lambda pipe: pipe("warm-up", num_inference_steps=2, output_type="np", progress=False,
                             generator=torch.Generator().manual_seed(0))


def convert(modules: dict[str, nn.Module], amax: Mapping[str, float],
            t5_amax: Mapping[str, float] | None = None) -> dict[str, nn.Module]:
    """The modules as the set stores them, in place: FP8 MMDiT (fused q/k/v, fast accumulation,
    sigmoid-form GELU), T5-XXL with FP8 GEMMs from `t5_amax` (weight-only FP8 without it); the
    CLIPs and the VAE as they are (bf16)."""
    from ..runtime.models.fp8 import to_fp8
    from ..runtime.models.fp8_text import t5_precision
    from ..runtime.models.mmdit import use_sigmoid_gelu

    modules["transformer"] = to_fp8(modules["transformer"], amax, fast_accum=True)
    use_sigmoid_gelu(modules["transformer"], True)
    if "t5" in modules:
        t5_precision(modules["t5"], t5_amax, "the T5 calibration of this build")
    return modules


def _hf_config(module: nn.Module) -> dict | None:
    inner = getattr(module, "model", None)
    cfg = getattr(inner, "config", None)
    return json.loads(cfg.to_json_string()) if cfg is not None else None


def write_set(modules: dict[str, nn.Module], amax: Mapping[str, float], config: VariantConfig,
              tokenizers: Checkpoint, out: Path, *, gpu: str, build: BuildArgs, compile: str,
              attention: str, versions: Mapping[str, Any], log: Callable[[str], None] = print,
              compile_scope: str = "model", fusions: tuple[str, ...] = (),
              t5_amax: tuple[Mapping[str, float], Mapping[str, str]] | None = None,
              gemm: str = "cublas") -> EngineManifest:
    """Convert `modules` (bf16, the torch backend's signatures) and write them, the calibration
    (T5's beside the MMDiT's when given: (amax, metadata)), the tokenizers, an empty artifact file
    and the manifest into `out` (no GPU needed: CI checks sets written here). `fusions`
    (runtime/backends/fp8_fusions.py, none by default) go into the transformer's flags; the loader
    applies them; so is `gemm`, the FP8 GEMM the warm-up compiles (runtime/models/fp8_gemm.py: 'quack'
    records quack's version, which a loading process must have). Consumes `modules`."""
    from ..runtime.models.fp8_gemm import quack_version
    from ..runtime.models.fp8_text import save_t5_amax

    fusions = check_fusions(fusions)  # before any write
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)
    remove_temporaries(out / Path(CALIBRATION).parent)
    (out / MANIFEST).unlink(missing_ok=True)  # the set is not valid until this build finishes
    convert(modules, amax, t5_amax[0] if t5_amax else None)
    t5_mode = "fp8-gemms" if t5_amax else "fp8-weights"  # models.fp8_text.t5_precision's names
    shapes = EngineShapes.for_variant(config)
    profiles = json.loads(json.dumps(shapes.profiles(config)))
    fp8_layers = sum(type(m).__name__ == "FP8Linear" for m in modules["transformer"].modules())
    entries: dict[str, EngineEntry] = {}
    for comp in list(modules):
        module = modules.pop(comp)
        flags: dict[str, Any] = {"compile": compile if comp in ("transformer", "vae_decoder") else TEXT_EAGER}
        if comp == "transformer":
            flags.update(fast_accum=True, sigmoid_gelu=True, attention=attention, fp8_layers=fp8_layers,
                         compile_scope=compile_scope, gemm=gemm)
            if gemm == "quack":
                flags["quack_version"] = quack_version()
            if fusions:  # absent = none (sets written before fusions existed read the same)
                flags["fusions"] = list(fusions)
        if comp == "t5":
            flags["t5_precision"] = t5_mode
        if (hf := _hf_config(module)) is not None:
            flags["hf_config"] = hf
        path = save_state(module, out / file_name(comp))
        entries[comp] = _entry(path, profiles.get(comp, {}), flags, gpu, versions,
                               "fp8" if comp in ("transformer", "t5") else "bf16")
        log(f"wrote {path.name} ({path.stat().st_size / 2**30:.2f} GiB)")
        del module
    _save_amax(amax, out / CALIBRATION)
    t5_file = out / Path(CALIBRATION).parent / "t5_amax.safetensors"
    if t5_amax and t5_mode == "fp8-gemms":
        save_t5_amax(t5_amax[0], t5_file.parent, t5_amax[1])
    else:
        t5_file.unlink(missing_ok=True)  # a set rebuilt without T5's calibration
    copy_tokenizers(tokenizers, out)
    return commit_cache(EngineManifest(config, "fp8", "bf16", FLAVOR, "torch", versions["torch_version"], gpu,
                                       shapes, build, entries), out, b"", {}, versions)


def commit_cache(m: EngineManifest, out: Path, blob: bytes, timings: Mapping[str, Any],
                 versions: Mapping[str, Any], kernels: Mapping[str, bytes] | None = None) -> EngineManifest:
    """Write the compile artifacts (made with `versions`; quack's `kernels` beside them) and the
    manifest that lists them."""
    path = save_cache(blob, out / file_name(CACHE), kernels=kernels)
    entries = {**m.components, CACHE: _entry(path, {}, {**versions, "timings": dict(timings)}, m.target, versions,
                                              "artifacts")}
    m = EngineManifest(m.variant, m.precision, m.dtype, m.flavor, m.library, m.library_version, m.target, m.shapes,
                       m.build, entries)
    m.save(out)
    return m


def build_torch_set(modules: dict[str, nn.Module], amax: Mapping[str, float], config: VariantConfig,
                    tokenizers: Checkpoint, out: str | Path, *, gpu: str, source: str,
                    calibration: str | None = None, compile: str = "reduce-overhead",
                    warmup: Warmup | None = None, log: Callable[[str], None] = print,
                    compile_scope: str = "model", fusions: tuple[str, ...] = (),
                    t5_amax: tuple[Mapping[str, float], Mapping[str, str]] | None = None) -> EngineManifest:
    """Write a torch-fp8 engine set of these bf16 component modules (on the GPU) into `out`, warm
    it up through the runtime and save the compile artifacts; returns its manifest (the build's
    timings are in its compile-cache entry)."""
    from ..runtime.models.flash_attention import choose_attention
    from ..runtime.models.fp8_gemm import choose_gemm

    _check_scope(compile_scope)  # before any write: the scope is used only at the warm-up
    cc = device_cc()
    if gpu != cc:
        raise InvalidInputError(f"gpu={gpu}: a torch-fp8 set is compiled on the GPU it runs on, and this one is "
                                f"{cc}; build on a {gpu} machine, or pass --gpu {cc}")
    out = Path(out)
    t0 = time.perf_counter()
    build = BuildArgs(onnx=source, out=str(out), gpu=gpu, flavor=FLAVOR, dynamic=False, batch=[1, 1],
                      calibration=calibration)
    attention = choose_attention("cuda", torch.bfloat16).name  # what a loading process must also run
    gemm = choose_gemm("cuda").name  # likewise (quack on sm90 when it imports)
    versions = installed_versions()
    m = write_set(modules, amax, config, tokenizers, out, gpu=gpu, build=build, compile=compile,
                  attention=attention, versions=versions, log=log, compile_scope=compile_scope,
                  fusions=fusions, t5_amax=t5_amax, gemm=gemm)
    torch.cuda.empty_cache()
    return warm_set(m, out, warmup or default_warmup(config), versions,
                    {"write_s": round(time.perf_counter() - t0, 1)}, log)


def warm_set(m: EngineManifest, out: Path, warmup: Warmup, versions: Mapping[str, Any], timings: dict[str, Any],
             log: Callable[[str], None] = print) -> EngineManifest:
    """Load the written set as any process would (no artifacts yet), run `warmup` on it, and save
    the compile artifacts it produced into the set (the manifest last)."""
    from ..runtime.pipeline import Pipeline

    t = time.perf_counter()
    pipe = Pipeline.from_pretrained(out)
    warmup(pipe)
    torch.cuda.synchronize()
    timings["compile_s"] = round(time.perf_counter() - t, 1)
    pipe.close()
    blob, info = torch.compiler.save_cache_artifacts()
    kernels = {}
    if m.components["transformer"].flags.get("gemm") == "quack":  # its kernels, compiled by the warm-up
        from ..runtime.models.quack_kernels import kernel_files

        kernels = kernel_files()
    timings["artifacts_mib"] = round(len(blob) / 2**20, 2)
    timings["quack_kernels"] = len(kernels)
    log(f"compiled in {timings['compile_s']} s; artifacts {timings['artifacts_mib']} MiB, quack kernels "
        f"{len(kernels)} ({sum(map(len, kernels.values())) / 2**20:.1f} MiB) ({str(info)[:300]})")
    return commit_cache(m, out, blob, timings, versions, kernels)


def _entry(path: Path, profiles: Mapping[str, Any], flags: Mapping[str, Any], gpu: str,
           versions: Mapping[str, Any], precision: str) -> EngineEntry:
    return EngineEntry(onnx_sha256="", flavor=FLAVOR, library_version=versions["torch_version"], target=gpu,
                       profiles=dict(profiles), flags={**flags, "sha256_chunks": chunk_hashes(path)},
                       file=path.name, sha256=sha256_file(path),
                       bytes=path.stat().st_size, precision=precision, library="torch")


def _save_amax(amax: Mapping[str, float], path: Path) -> None:
    from safetensors.torch import save

    blob = save({k: torch.tensor(float(v), dtype=torch.float32) for k, v in amax.items()})
    atomic_write(path, lambda f: f.write(blob))


def _check_scope(scope: str) -> None:
    if scope not in COMPILE_SCOPES:
        raise InvalidInputError(f"compile_scope={scope!r}: use one of {', '.join(COMPILE_SCOPES)} (`sd35trt build "
                                f"--compile-scope`: model for the faster step, blocks for the faster first image)")


def build_from_checkpoint(model: str | Path, calibration: str | Path, out: str | Path | None = None, *,
                          gpu: str, compile: str = "reduce-overhead", family: str | None = None,
                          compile_scope: str = "model", fusions: tuple[str, ...] = ()) -> tuple[Path, EngineManifest]:
    """`sd35trt build --flavor torch-fp8 --model M --calibration C --gpu smXX`: the checkpoint's
    modules loaded in bf16 on the GPU, the calibration `sd35trt export --precision fp8` wrote."""
    from ..runtime.components import RUNTIME
    from ..runtime.models.fp8 import load_amax
    from ..runtime.models.loader import load_modules
    from ..runtime.torch_engine_set import default_dir

    _check_scope(compile_scope)
    fusions = check_fusions(fusions)
    amax = load_amax(calibration)  # a missing calibration fails before any weights are read
    ckpt = Checkpoint.open(model, family=family)
    out = Path(out) if out is not None else default_dir(ckpt.config.name, gpu)
    names = [c.name for c in RUNTIME if c.name != "vae_encoder"]
    modules = load_modules(ckpt, names, torch.device("cuda"), torch.bfloat16)
    t5_amax = set_t5_amax(modules, ckpt, calibration)
    m = build_torch_set(modules, amax, ckpt.config, ckpt, out, gpu=gpu, source=str(model),
                        calibration=str(calibration), compile=compile, compile_scope=compile_scope,
                        fusions=fusions, t5_amax=t5_amax)
    return out, m


def set_t5_amax(modules: Mapping[str, nn.Module], ckpt: Checkpoint, calibration: str | Path,
                num_prompts: int = 16) -> tuple[dict[str, float], dict[str, str]] | None:
    """T5's calibration for a set: the one beside `calibration` (`sd35trt export` writes it), else
    made now on the loaded T5 over the first `num_prompts` calibration pairs (< 2 s on a GPU);
    None without T5 or its tokenizer (then T5 is weight-only FP8)."""
    from ..runtime.models.fp8_text import load_t5_amax
    from ..runtime.text import load_tokenizers
    from .calibrate import calibrate_t5

    if "t5" not in modules:
        return None
    found = load_t5_amax(calibration)  # CheckpointError: an unreadable file is not silently replaced
    if found is not None:
        return found
    tokenizer = load_tokenizers(ckpt)[2]
    if tokenizer is None:
        return None
    amax, meta = calibrate_t5(modules["t5"], tokenizer, ckpt.config, num_prompts, next(modules["t5"].parameters()).device)
    return amax, {**meta, "made_by": "build"}


__all__ = ["build_from_checkpoint", "build_torch_set", "convert", "default_warmup", "warm_set", "write_set"]
