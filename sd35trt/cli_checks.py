"""What the command line checks before it imports torch or loads a weight: flag values, the kind
of folder or file `--model` is, whether the backend can run it, and the request against the
model's own config (read from its JSON files: the size range, an engine set's profile). A refusal
is a `UsageError` naming the flag and the fix; it costs well under a second.

The runtime's own checks still run later (Pipeline.check_request, the backends' preflight); their
messages name Python arguments (`num_inference_steps=0`), which `flagged` rewrites to the flags
(`--steps 0`).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .runtime.errors import Sd35Error

# Backends by name, as registered in runtime/backends/__init__.py (tests/test_cli.py keeps the two equal).
BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx", "torch", "torch-fp8")
TORCH_BACKENDS = ("torch", "torch-fp8")
ENGINE_BACKENDS = ("tensorrt", "tensorrt-rtx")
# Samplers by name, as runtime/samplers.py defines them (tests/test_cli_errors.py keeps the two equal).
SAMPLERS = ("euler", "dpmpp_2m", "dpmpp_2m_sde", "heun")
MEMORY_MODES = ("default", "balanced", "low")  # runtime/memory.py MODES (kept equal by a test)
COMPILE_MODES = ("off", "default", "reduce-overhead")  # torch-fp8 compile= False / True / "reduce-overhead"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")

# Python argument -> flag, for messages raised by the runtime and the server settings.
FLAGS = {
    "num_inference_steps": "--steps", "guidance_scale": "--guidance", "negative_prompt": "--negative-prompt",
    "height": "--height", "width": "--width", "prompt": "--prompt", "dtype": "--dtype", "device": "--device",
    "compile": "--compile", "calibration": "--calibration", "family": "--family", "backend": "--backend",
    "model": "--model", "out": "--out", "precision": "--precision", "max_batch": "--max-batch",
    "batch_window_ms": "--batch-window-ms", "max_queue": "--max-queue", "workers": "--workers",
    "max_size": "--max-size", "max_steps": "--max-steps", "max_n": "--max-n", "limits.max_n": "--max-n",
    "max_prompt_chars": "--max-prompt-chars", "timeout_s": "--timeout-s", "intra_op_threads": "--intra-op-threads",
    "gpu": "--gpu", "flavor": "--flavor", "sampler": "--sampler", "image": "--image", "mask_image": "--mask",
    "strength": "--strength", "skip_guidance_layers": "--slg", "control_image": "--control-image",
    "controlnet_conditioning_scale": "--control-scale", "controlnet": "--controlnet",
}
_ARG = re.compile(r"(?<![\w.-])(" + "|".join(sorted(map(re.escape, FLAGS), key=len, reverse=True)) + r")=")


class UsageError(Sd35Error, ValueError):
    """A flag is wrong; the message names it and says what to pass instead."""


def flagged(message: str) -> str:
    """'num_inference_steps=0 must be ...' -> '--steps 0 must be ...' (every known argument)."""
    return _ARG.sub(lambda m: FLAGS[m.group(1)] + " ", message)


# --- argparse types: refuse a bad value while parsing ----------------------------------------------
def int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} must be >= {lo}")
        return value

    parse.__name__ = f"int >= {lo}"
    return parse


def percent(text: str) -> int:
    value = int_at_least(0)(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 100]")
    return value


def seed(text: str) -> int:
    value = int_at_least(0)(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"{value} must be < 2**63")
    return value


def port(text: str) -> int:
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0-65535; 0 picks a free one)")
    return value


def finite_float(minimum: float, inclusive: bool, note: str = ""):
    """An argparse type: a finite float >= minimum (> minimum unless `inclusive`)."""
    sign = ">=" if inclusive else ">"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {sign} {minimum:g}{note}")
        return value

    return parse


guidance = finite_float(0, True, " (<= 1 turns CFG off)")
positive_float = finite_float(0, False)
non_negative_float = finite_float(0, True)


def prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; describe the image")
    return text


def device(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N")
    return text


def gpu(text: str) -> str:
    if not re.match(r"^sm\d{2,3}$", text):
        raise argparse.ArgumentTypeError(f"{text!r}: name the target compute capability, e.g. sm89 (RTX 40xx, "
                                         f"L40S), sm90 (H100), sm120 (RTX 50xx)")
    return text


def image_path(text: str) -> Path:
    from .runtime.image import EXTENSIONS

    path = Path(text)
    if path.suffix.lower() not in EXTENSIONS:
        raise argparse.ArgumentTypeError(f"{text!r}: end the file name with {', '.join(EXTENSIONS)} (the "
                                         f"extension picks the format)")
    return path


# --- what a model path holds ------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What `--model` holds, read from its JSON files only (no torch, no weights)."""

    path: Path
    kind: str  # diffusers | single-file | export | engines
    config: Any = None  # VariantConfig, when readable without torch (all kinds but single-file)
    manifest: Any = None  # ExportManifest | EngineManifest

    @property
    def default_backend(self) -> str:
        return {"export": "onnxruntime", "engines": getattr(self.manifest, "flavor", "")}.get(self.kind, "torch")

    @property
    def source(self) -> str:
        """The checkpoint an export folder was made from (or the ONNX folder of an engine set)."""
        if self.kind == "export":
            return self.manifest.source
        return self.manifest.build.onnx if self.kind == "engines" else str(self.path)


def inspect_model(path: Path, flag: str = "--model", family: str | None = None) -> ModelInfo:
    """The kind of `path` and its config; UsageError naming `flag` when it is none of the four."""
    from .runtime.config import VariantConfig
    from .runtime.engine_manifest import FORMAT as ENGINES
    from .runtime.engine_manifest import EngineManifest
    from .runtime.files import MANIFEST, read_json
    from .runtime.manifest import FORMAT as ONNX
    from .runtime.manifest import ExportManifest

    kinds = "an SD3.5 diffusers folder, a .safetensors checkpoint, an `sd35trt export` folder or an engine set"
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file or folder; pass {kinds}")
    if path.is_dir() and (path / MANIFEST).is_file():
        doc = read_json(path / MANIFEST)
        fmt = doc.get("format") if isinstance(doc, dict) else None
        if fmt not in (ONNX, ENGINES):
            raise UsageError(f"{flag} {path}: {path / MANIFEST} is not an sd35trt manifest (format {fmt!r}); "
                             f"re-export with `sd35trt export --out {path}` or pass {kinds}")
        kind, manifest = ("export", ExportManifest.load(path)) if fmt == ONNX else ("engines", EngineManifest.load(path))
        config = manifest.variant
        return ModelInfo(path, kind, config.with_family(family) if family else config, manifest)
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "transformer").is_dir():
            raise UsageError(f"{flag} {path}: this folder holds no SD3.5 model (no model_index.json, transformer/ "
                             f"or manifest.json); pass {kinds}")
        return ModelInfo(path, "diffusers", VariantConfig.from_checkpoint(path, family=family))
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(f"{flag} {path}: pickle checkpoints ({path.suffix}) are never loaded (they can run code); "
                         f"use the .safetensors release")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise UsageError(f"{flag} {path}: not a folder or a .safetensors file; pass {kinds}")
    return ModelInfo(path, "single-file")


def check_backend(info: ModelInfo, backend: str | None, flag: str = "--model") -> str:
    """The backend to use (`backend`, or what the path holds), refusing one that cannot run it."""
    name = backend or info.default_backend
    p = info.path
    if name == "torch-fp8" and info.kind == "engines" and info.manifest.flavor == name:
        return name  # a torch-fp8 engine set
    if name in TORCH_BACKENDS and info.kind in ("export", "engines"):
        what = "an `sd35trt export` folder" if info.kind == "export" else "an engine set"
        fix = f"{flag} {info.source}" if info.kind == "export" else f"{flag} <the checkpoint>"
        if name == "torch-fp8" and info.kind == "export":
            fix += f" --calibration {p / 'calibration'}"
        raise UsageError(f"--backend {name} runs torch weights, and {flag} {p} is {what}; pass {fix}, or "
                         f"drop --backend ({info.default_backend} runs {p})")
    if name == "onnxruntime" and info.kind != "export":
        fix = (f"pass {flag} {info.source} (the export it was built from)" if info.kind == "engines" else
               f"export it first: sd35trt export --model {p} --out {p.parent / (p.stem + '-onnx')} --dtype fp32")
        raise UsageError(f"--backend onnxruntime runs an `sd35trt export` folder, and {flag} {p} is not one; {fix}")
    if name in ENGINE_BACKENDS:
        if info.kind != "engines":
            raise UsageError(f"--backend {name} runs an engine set, and {flag} {p} is not one; build one with "
                             f"`sd35trt build --onnx EXPORT_DIR --gpu smXX` (from an `sd35trt export` folder)")
        if info.manifest.flavor != name:
            raise UsageError(f"--backend {name}: {p} was built with {info.manifest.flavor}; use --backend "
                             f"{info.manifest.flavor} (or drop --backend)")
    return name


def calibration_dir(text: str | None, backend: str) -> Path | None:
    """torch-fp8's FP8 scales: a folder with amax.safetensors, or an export folder holding calibration/."""
    if backend != "torch-fp8":
        if text is not None:
            raise UsageError(f"--calibration applies to --backend torch-fp8 only (not {backend}); drop it")
        return None
    if text is None:
        raise UsageError("--backend torch-fp8 needs --calibration DIR: the calibration/ folder of an "
                         "`sd35trt export --precision fp8` output (or that export folder itself)")
    path = Path(text)
    for cand in (path, path / "calibration"):
        if (cand / "amax.safetensors").is_file():
            return cand
    if path.is_file() and path.name == "amax.safetensors":
        return path.parent
    raise UsageError(f"--calibration {path}: no amax.safetensors there or in {path / 'calibration'}; run "
                     f"`sd35trt export --precision fp8` and pass its output folder")


def backend_options(args: argparse.Namespace, backend: str, kind: str | None = None) -> dict[str, Any]:
    """Backend keyword options from the flags, refusing the ones this backend does not take
    (`kind`: what --model holds; a torch-fp8 engine set carries its own calibration)."""
    opts: dict[str, Any] = {}
    dev = getattr(args, "device", None)
    if backend == "onnxruntime" and dev not in (None, "cpu"):
        raise UsageError(f"--device {dev}: the command line runs ONNX Runtime on the CPU; drop --device (the "
                         f"CUDA provider is reached from Python: Pipeline.from_pretrained(..., providers=[...]))")
    if backend in ENGINE_BACKENDS and dev is not None and not dev.startswith("cuda"):
        raise UsageError(f"--device {dev}: {backend} engines run on CUDA devices (cuda, cuda:N)")
    if dev is not None and backend != "onnxruntime":
        opts["device"] = dev
    dtype = getattr(args, "dtype", None)
    if dtype is not None:
        if backend not in TORCH_BACKENDS:
            raise UsageError(f"--dtype applies to the torch backends; {backend} runs at the precision fixed when "
                             f"the model was exported or built; drop --dtype")
        if backend == "torch-fp8" and dtype != "bf16":
            raise UsageError(f"--dtype {dtype}: torch-fp8 runs FP8 GEMMs with bf16 outputs; drop --dtype")
        opts["dtype"] = dtype
    compile_mode = getattr(args, "compile", None)
    if compile_mode is not None:
        if backend != "torch-fp8":
            raise UsageError(f"--compile applies to --backend torch-fp8 only (not {backend}); drop it")
        opts["compile"] = {"off": False, "default": True}.get(compile_mode, compile_mode)
    if kind == "engines" and getattr(args, "calibration", None) is not None:
        raise UsageError("--calibration does not apply to an engine set (a torch-fp8 set carries its own); drop it")
    calib = None if kind == "engines" else calibration_dir(getattr(args, "calibration", None), backend)
    if calib is not None:
        opts["calibration"] = calib
    for flag, key in (("--slots", "slots"), ("--weight-streaming-budget", "weight_streaming_budget")):
        value = getattr(args, key, None)
        if value is not None:
            if backend not in ENGINE_BACKENDS:
                raise UsageError(f"{flag} applies to the engine backends (tensorrt, tensorrt-rtx), not {backend}; "
                                 f"drop it")
            opts[key] = value
    memory = getattr(args, "memory", None)
    if memory not in (None, "default"):
        if backend == "onnxruntime":
            raise UsageError(f"--memory {memory} applies to the backends that hold weights on the GPU (torch, "
                             f"torch-fp8, tensorrt); onnxruntime keeps its sessions as loaded: drop --memory")
        if memory == "low" and opts.get("compile") == "reduce-overhead":
            raise UsageError("--memory low with --compile reduce-overhead: CUDA graphs hold the weights' addresses, "
                             "which low frees after every stage; use --compile default")
    if memory is not None:
        opts["memory"] = memory
    threads = getattr(args, "intra_op_threads", None)
    if threads:
        if backend != "onnxruntime":
            raise UsageError(f"--intra-op-threads applies to --backend onnxruntime only (not {backend}); drop it")
        opts["intra_op_threads"] = threads
    return opts


def check_size(info: ModelInfo, height: int | None, width: int | None) -> None:
    """Height and width against the model's range (and an engine set's profile), when the config is
    readable without torch; single files are checked once their headers are read."""
    from .runtime.errors import InvalidInputError

    if info.config is None:
        return
    h = info.config.default_size if height is None else height
    w = info.config.default_size if width is None else width
    lo = hi = None
    fixed = info.kind == "engines" and info.manifest.flavor != "torch-fp8"  # a torch set compiles other sizes
    if fixed:
        lo, _, hi = info.manifest.shapes.sizes
    try:
        info.config.check_size(h, w, min_size=lo, max_size=hi)
    except InvalidInputError as exc:
        where = f" ({info.path} is built for {lo}-{hi} px)" if fixed else ""
        raise UsageError(flagged(str(exc)) + where) from None


def require_cuda(options: Mapping[str, Any], backend: str) -> None:
    """--device cuda on a machine where torch sees no CUDA device: one line, before any loading."""
    dev = str(options.get("device") or "")
    if not dev.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise UsageError(f"--device {dev}: {why} (torch {torch.__version__}); use --device cpu, or run where a "
                         f"CUDA GPU and a CUDA build of torch are installed")
    index = int(dev.split(":")[1]) if ":" in dev else 0
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s) are visible; use "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
