"""manifest.json of an engine set (`sd35trt build`), and the checks run on it before any engine is
deserialized.

Everything here is pure (no TensorRT, no GPU): the build writes the manifest, the TensorRT backends
call `preflight` and `check_shapes` before touching an engine, and CI exercises both on engine sets
it really built. Every refusal names the file and the exact `sd35trt build` command that fixes it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import CFG_DOUBLED, VariantConfig
from .errors import CheckpointError, InvalidInputError
from .manifest import ENGINES_FORMAT as FORMAT
from .manifest import MANIFEST, sha256_file

# Compute capabilities with FP8 (E4M3) tensor cores: Ada, Hopper, Blackwell (datacenter, RTX, GB10).
FP8_GPUS = ("sm89", "sm90", "sm100", "sm120", "sm121")

Shape = tuple[int, ...]
MinOptMax = tuple[Shape, Shape, Shape]


class EngineSetError(CheckpointError):
    """An engine set is missing, corrupted, stale, or built for another GPU or library version."""


class EngineShapeError(InvalidInputError):
    """A request's tensor shape lies outside the optimization profile an engine was built with."""


@dataclass(frozen=True)
class EngineShapes:
    """Which request shapes an engine set covers: square `sizes` (min, opt, max) in pixels (any
    height and width in that range work), image `batches` (min, opt, max), CFG doubling."""

    dynamic: bool
    sizes: tuple[int, int, int]
    batches: tuple[int, int, int]
    cfg: bool

    @classmethod
    def for_variant(cls, config: VariantConfig, dynamic: bool = False, batch: tuple[int, int] = (1, 1),
                    min_size: int | None = None, max_size: int | None = None) -> EngineShapes:
        """Static: the variant's default size. Dynamic: `min_size`..`max_size`, by default half to
        one and a half times the default size (512..1536 for SD3.5), capped by the positional
        embedding. CFG doubling whenever the variant's default guidance uses CFG (not Turbo)."""
        lo_b, hi_b = batch
        if not (type(lo_b) is int and type(hi_b) is int and 1 <= lo_b <= hi_b):
            raise InvalidInputError(f"batch={lo_b}-{hi_b} must be 1 <= min <= max images per request, e.g. 1 or 1-4")
        default, step = config.default_size, config.size_multiple
        if not dynamic:
            if (min_size, max_size) != (None, None):
                raise InvalidInputError(
                    f"min_size={min_size}/max_size={max_size} apply to dynamic engines; add --dynamic, "
                    f"or drop them for static {default}x{default} engines")
            sizes = (default,) * 3
        else:
            lo = min_size if min_size is not None else -(-default // 2 // step) * step
            hi = max_size if max_size is not None else min(default * 3 // 2 // step * step, config.max_size)
            if type(lo) is not int or type(hi) is not int or lo > hi:
                raise InvalidInputError(f"min_size={lo}, max_size={hi}: need min_size <= max_size (pixels)")
            sizes = (lo, min(max(default, lo), hi), hi)
        for s in sizes:
            config.check_size(s, s)
        return cls(dynamic, sizes, (lo_b, lo_b, hi_b), config.sampling.guidance > 1.0)

    def profiles(self, config: VariantConfig) -> dict[str, dict[str, MinOptMax]]:
        return config.engine_profiles(self.sizes, self.batches, self.cfg)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineShapes:
        return cls(bool(d["dynamic"]), tuple(d["sizes"]), tuple(d["batches"]), bool(d["cfg"]))


def read_engine_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EngineSetError(f"{path} is missing: {folder} is not an engine set; build one with "
                             f"`sd35trt build --onnx ONNX_DIR --out {folder} --gpu smXX`")
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT:
        raise EngineSetError(f"{path}: format {doc.get('format')!r}, the TensorRT backends read {FORMAT!r}; "
                             f"build an engine set with `sd35trt build --onnx {folder} --out ENGINE_DIR --gpu smXX`")
    return doc


def rebuild_command(doc: Mapping[str, Any], **changes: Any) -> str:
    """The `sd35trt build` command that made this set, with `changes` (gpu=, flavor=, dynamic=,
    batch=(lo, hi), min_size=, max_size=) applied."""
    b = {**doc["build"], **changes}
    argv = ["sd35trt", "build", "--onnx", b["onnx"], "--out", b["out"], "--gpu", b["gpu"], "--flavor", b["flavor"]]
    if b.get("variant"):
        argv += ["--variant", b["variant"]]
    argv.append("--dynamic" if b["dynamic"] else "--static")
    lo, hi = b["batch"]
    argv += ["--batch", str(lo) if lo == hi else f"{lo}-{hi}"]
    if b["dynamic"] and b.get("min_size") is not None:
        argv += ["--min-size", str(b["min_size"]), "--max-size", str(b["max_size"])]
    if b.get("opt_level") is not None:
        argv += ["--opt-level", str(b["opt_level"])]
    argv += [flag for key, flag in (("refit", "--refit"), ("weight_streaming", "--weight-streaming")) if b.get(key)]
    if b.get("timing_cache"):
        argv += ["--timing-cache", b["timing_cache"]]
    return shlex.join(str(a) for a in argv)


def device_cc(device: Any = None) -> str:
    """Compute capability of a CUDA device as 'smXY' (torch.cuda.get_device_capability)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def check_flavor(doc: Mapping[str, Any], folder: Path, flavor: str) -> None:
    if doc["flavor"] != flavor:
        raise EngineSetError(
            f"{Path(folder) / MANIFEST}: engines were built with {doc['flavor']!r}, not {flavor!r}; load them "
            f"with backend={doc['flavor']!r}, or rebuild: {rebuild_command(doc, flavor=flavor)}")


def check_library(doc: Mapping[str, Any], folder: Path, installed: str) -> None:
    """TensorRT engines only deserialize in the library version that built them."""
    for comp, e in doc["components"].items():
        if e["library_version"] != installed:
            raise EngineSetError(
                f"{Path(folder) / e['file']} was built with {e['flavor']} {e['library_version']}, but "
                f"{installed} is installed: engines only load in the version that built them. Rebuild the "
                f"set with the installed version: {rebuild_command(doc)} (or install {e['flavor']} "
                f"{e['library_version']})")


def check_device(doc: Mapping[str, Any], folder: Path, cc: str) -> None:
    for comp, e in doc["components"].items():
        if e["target"] != cc:
            raise EngineSetError(
                f"{Path(folder) / e['file']} targets {e['target']}, this GPU is {cc}; rebuild for it: "
                f"{rebuild_command(doc, gpu=cc, out=_sibling_out(doc, cc))}")


def check_engine_files(doc: Mapping[str, Any], folder: Path) -> None:
    """Every engine exists and has the sha256 the build recorded (catches truncation, corruption
    and engines copied in from another set)."""
    for comp, e in doc["components"].items():
        path = Path(folder) / e["file"]
        if not path.is_file():
            raise EngineSetError(f"{path} is missing; rebuild: {rebuild_command(doc)}")
        if sha256_file(path) != e["sha256"]:
            raise EngineSetError(
                f"{path} does not match its manifest (sha256 differs: corrupted, truncated or replaced); "
                f"rebuild it: {rebuild_command(doc)}")


def preflight(doc: Mapping[str, Any], folder: Path, *, flavor: str, installed: str, cc: str) -> None:
    """All checks the backends make before deserializing: flavor, library version, GPU, file hashes."""
    check_flavor(doc, folder, flavor)
    check_library(doc, folder, installed)
    check_device(doc, folder, cc)
    check_engine_files(doc, folder)


def check_shapes(doc: Mapping[str, Any], folder: Path, component: str, shapes: Mapping[str, Shape]) -> None:
    """Refuse a request whose input shapes fall outside `component`'s profile, saying what to rebuild."""
    entry = doc["components"][component]
    for name, shape in shapes.items():
        lo, _, hi = entry["profiles"][name]
        if len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            continue
        note = ""
        if component in ("t5", "transformer") and len(shape) > 1 and len(lo) > 1 and not lo[1] <= shape[1] <= hi[1]:
            clip = VariantConfig.from_dict(doc["variant"]).clip_tokens if component == "transformer" else 0
            note = (f" The text length is fixed at build time ({lo[1]}..{hi[1]} tokens): call with "
                    f"max_sequence_length={lo[1] - clip}.")
        raise EngineShapeError(
            f"{component} input {name!r} has shape {list(shape)}, outside {Path(folder) / entry['file']}'s "
            f"profile {list(lo)}..{list(hi)}.{note} Rebuild engines that cover it: "
            f"{rebuild_command(doc, **_covering(doc, component, shape))}")


def _covering(doc: Mapping[str, Any], component: str, shape: Shape) -> dict[str, Any]:
    """Build options widened to include a request of `shape` (batch from dim 0, pixels from latents)."""
    config = VariantConfig.from_dict(doc["variant"])
    shapes = EngineShapes.from_dict(doc["shapes"])
    per_image = 2 if shapes.cfg and component in CFG_DOUBLED else 1
    batch = max(1, shape[0] // per_image) if shape else 1
    lo, hi = shapes.sizes[0], shapes.sizes[2]
    if component in ("transformer", "vae_decoder") and len(shape) == 4:
        f = config.vae.scale_factor
        lo, hi = min(lo, shape[2] * f, shape[3] * f), max(hi, shape[2] * f, shape[3] * f)
    b_lo, _, b_hi = shapes.batches
    return {"dynamic": True, "min_size": lo, "max_size": hi, "batch": (min(b_lo, batch), max(b_hi, batch))}


def _sibling_out(doc: Mapping[str, Any], cc: str) -> str:
    """engines/<variant>-<precision>-sm89 -> engines/<variant>-<precision>-sm120 (else the same)."""
    out, old = doc["build"]["out"], doc["build"]["gpu"]
    return out[: -len(old)] + cc if out.endswith(old) else out
