"""manifest.json of an engine set (`sd35trt build`): read, written and checked here only, and the
checks run on it before any engine is deserialized.

Everything here is pure (no TensorRT, no GPU): the build writes the manifest, the TensorRT backends
call `preflight` and `check_shapes` before touching an engine, and CI exercises both on engine sets
it really built. Every refusal names the file and the exact `sd35trt build` command that fixes it.
What a backend needs to load a flavor (its module, how to install it, its dtype names) is here too;
what the builder does with a flavor stays in the export side (`export/trt_build.py`).
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from .config import VariantConfig
from .errors import CheckpointError, InvalidInputError
from .files import MANIFEST, file_matches, write_json_atomic
from .manifest import entry_from_dict, read_document

FORMAT = "sd35trt-engines/1"

# Compute capabilities with FP8 (E4M3) tensor cores: Ada, Hopper, Blackwell (datacenter, RTX, GB10).
FP8_GPUS = ("sm89", "sm90", "sm100", "sm120", "sm121")

Shape = tuple[int, ...]
MinOptMax = tuple[Shape, Shape, Shape]


@dataclass(frozen=True)
class Library:
    """What a backend needs to load engines of one flavor."""

    module: str
    install: str


LIBRARIES = {
    "tensorrt-rtx": Library("tensorrt_rtx_bindings", "pip install 'sd35trt[trt-rtx]'"),
    "tensorrt": Library("tensorrt", "install enterprise TensorRT (`pip install tensorrt`) on a GPU host"),
}
# TensorRT DataType member name -> the dtype names manifests and the component table use.
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "FP8": "float8_e4m3fn",
              "INT8": "int8", "INT32": "int32", "INT64": "int64", "BOOL": "bool", "UINT8": "uint8",
              "INT4": "int4", "FP4": "float4_e2m1fn", "E8M0": "float8_e8m0fnu"}
# Export dtype (ONNX manifest "dtype") -> tensor dtype name.
FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


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

    def profiles(self, config: VariantConfig, residuals: int | None = None) -> dict[str, dict[str, MinOptMax]]:
        """`residuals`: the set's ControlNet block count (None: built without a ControlNet)."""
        return config.engine_profiles(self.sizes, self.batches, self.cfg, residuals)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineShapes:
        return cls(bool(d["dynamic"]), tuple(d["sizes"]), tuple(d["batches"]), bool(d["cfg"]))



@dataclass(frozen=True)
class BuildArgs:
    """The `sd35trt build` arguments a set was made with (so a refusal can print the rebuild)."""

    onnx: str
    out: str
    gpu: str
    flavor: str
    dynamic: bool
    batch: list[int]
    family: str | None = None  # family override (large <-> large-turbo)
    min_size: int | None = None
    max_size: int | None = None
    opt_level: int | None = None
    refit: bool = False
    weight_streaming: bool = False
    timing_cache: str | None = None
    calibration: str | None = None  # torch-fp8 sets: built from `onnx` = the checkpoint, with this calibration


@dataclass(frozen=True)
class EngineEntry:
    """One engine: what it was built from and for (compared to decide freshness), and what it holds."""

    onnx_sha256: str
    flavor: str
    library_version: str
    target: str
    profiles: Mapping[str, list]  # input -> [min, opt, max] shapes
    flags: Mapping[str, Any]
    file: str
    sha256: str
    bytes: int
    precision: str
    library: str = ""
    onnx_file: str = ""
    inputs: list = field(default_factory=list)  # [{name, dtype, shape}] as the parsed network declares
    outputs: list = field(default_factory=list)
    built_profiles: Mapping[str, list] = field(default_factory=dict)
    applied_flags: Mapping[str, Any] = field(default_factory=dict)
    parse_seconds: float = 0.0
    build_seconds: float = 0.0
    peak_rss_mib: float = 0.0

    # The fields a build compares with what it would build now.
    INPUTS = ("onnx_sha256", "flavor", "library_version", "target", "profiles", "flags")

    def is_fresh(self, folder: Path, want: Mapping[str, Any]) -> bool:
        return all(getattr(self, k) == v for k, v in want.items()) and file_matches(folder / self.file, self.sha256)


@dataclass(frozen=True)
class EngineManifest:
    variant: VariantConfig
    precision: str
    dtype: str  # export dtype of the non-FP8 part: fp32 | fp16 | bf16
    flavor: str
    library: str
    library_version: str
    target: str
    shapes: EngineShapes
    build: BuildArgs
    components: Mapping[str, EngineEntry]
    format: str = FORMAT
    controlnet: dict | None = None  # the export's ControlNet record (runtime/control_graph.py)

    @classmethod
    def load(cls, folder: str | Path) -> EngineManifest:
        doc = read_document(folder, FORMAT, EngineSetError,
                            f": {folder} is not an engine set; build one with "
                            f"`sd35trt build --onnx ONNX_DIR --out {folder} --gpu smXX`",
                            f"the TensorRT backends read {FORMAT!r}; build an engine set with "
                            f"`sd35trt build --onnx {folder} --out ENGINE_DIR --gpu smXX`")
        return cls.from_dict(doc, Path(folder) / MANIFEST)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: Path = Path(MANIFEST)) -> EngineManifest:
        fix = f"rebuild the set with `sd35trt build --onnx ONNX_DIR --out {path.parent} --gpu smXX`"
        try:
            comps = {c: entry_from_dict(EngineEntry, e, path, EngineSetError, fix) for c, e in doc["components"].items()}
            return cls(VariantConfig.from_dict(doc["variant"]), doc["precision"], doc["dtype"], doc["flavor"],
                       doc["library"], doc["library_version"], doc["target"], EngineShapes.from_dict(doc["shapes"]),
                       entry_from_dict(BuildArgs, doc["build"], path, EngineSetError, fix), comps,
                       controlnet=doc.get("controlnet") or None)
        except (KeyError, TypeError) as exc:
            raise EngineSetError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc}); {fix}") from exc

    @classmethod
    def load_existing(cls, folder: Path) -> EngineManifest | None:
        """The folder's manifest if it is a readable engine-set manifest, else None (build afresh)."""
        try:
            return cls.load(folder)
        except CheckpointError:
            return None

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "variant": self.variant.to_dict(), "precision": self.precision,
                "dtype": self.dtype, "flavor": self.flavor, "library": self.library,
                "library_version": self.library_version, "target": self.target, "shapes": self.shapes.to_dict(),
                "build": asdict(self.build), "components": {c: asdict(e) for c, e in self.components.items()},
                **({"controlnet": dict(self.controlnet)} if self.controlnet else {})}

    def save(self, folder: Path) -> None:
        write_json_atomic(Path(folder) / MANIFEST, self.to_dict())

    @property
    def residuals(self) -> int | None:
        """The ControlNet block count its transformer engine takes residuals for (None: no ControlNet)."""
        return int(self.controlnet["residuals"]) if self.controlnet else None

    def profiles(self) -> dict[str, dict[str, MinOptMax]]:
        return self.shapes.profiles(self.variant, self.residuals)


def rebuild_command(m: EngineManifest | Mapping[str, Any], folder: str | Path | None = None, **changes: Any) -> str:
    """The `sd35trt build` command that made this set (its manifest, or the manifest's JSON), with
    `changes` (gpu=, flavor=, dynamic=, batch=(lo, hi), min_size=, max_size=, out=,
    weight_streaming=) applied. `folder`: where the set is now (it may have been moved or copied
    since it was built); the command writes there unless `out=` says otherwise."""
    m = m if isinstance(m, EngineManifest) else EngineManifest.from_dict(m)
    if folder is not None:
        changes.setdefault("out", str(folder))
    b = replace(m.build, **changes)
    source = ["--model", b.onnx, "--calibration", b.calibration or "CALIBRATION_DIR"] if b.flavor == "torch-fp8" \
        else ["--onnx", b.onnx]  # a torch-fp8 set is built from the checkpoint and its FP8 calibration
    argv = ["sd35trt", "build", *source, "--out", b.out, "--gpu", b.gpu, "--flavor", b.flavor]
    if b.family:
        argv += ["--family", b.family]
    argv.append("--dynamic" if b.dynamic else "--static")
    lo, hi = b.batch
    argv += ["--batch", str(lo) if lo == hi else f"{lo}-{hi}"]
    if b.dynamic and b.min_size is not None:
        argv += ["--min-size", str(b.min_size), "--max-size", str(b.max_size)]
    if b.opt_level is not None:
        argv += ["--opt-level", str(b.opt_level)]
    argv += [flag for on, flag in ((b.refit, "--refit"), (b.weight_streaming, "--weight-streaming")) if on]
    if b.timing_cache:
        argv += ["--timing-cache", b.timing_cache]
    mmdit = m.components.get("transformer")
    if mmdit is not None and mmdit.flags.get("compile_scope", "model") != "model":  # a torch-fp8 set's scope
        argv += ["--compile-scope", mmdit.flags["compile_scope"]]
    return shlex.join(str(a) for a in argv)


def device_cc(device: Any = None) -> str:
    """Compute capability of a CUDA device as 'smXY' (torch.cuda.get_device_capability)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def check_flavor(m: EngineManifest, folder: Path, flavor: str) -> None:
    if m.flavor != flavor:
        raise EngineSetError(
            f"{Path(folder) / MANIFEST}: engines were built with {m.flavor!r}, not {flavor!r}; load them "
            f"with backend={m.flavor!r}, or rebuild: {rebuild_command(m, folder, flavor=flavor)}")


def check_library(m: EngineManifest, folder: Path, installed: str) -> None:
    """TensorRT engines only deserialize in the library version that built them."""
    for e in m.components.values():
        if e.library_version != installed:
            raise EngineSetError(
                f"{Path(folder) / e.file} was built with {e.flavor} {e.library_version}, but {installed} is "
                f"installed: engines only load in the version that built them. Rebuild the set with the "
                f"installed version: {rebuild_command(m, folder)} (or install {e.flavor} {e.library_version})")


def check_device(m: EngineManifest, folder: Path, cc: str) -> None:
    for e in m.components.values():
        if e.target != cc:
            raise EngineSetError(f"{Path(folder) / e.file} targets {e.target}, this GPU is {cc}; rebuild for it: "
                                 f"{rebuild_command(m, folder, gpu=cc, out=_sibling_out(m, folder, cc))}")


def check_engine_files(m: EngineManifest, folder: Path,
                       matches: Callable[[EngineEntry, Path], bool] | None = None) -> None:
    """Every runtime component is in the set (a build that was interrupted lists only what it
    finished), and every engine exists and has the sha256 the build recorded (catches truncation,
    corruption and engines copied in from another set). `matches(entry, path)` replaces the sha256
    test for sets whose files are verified another way (the torch-fp8 set hashes while it reads)."""
    from .components import RUNTIME  # here, not at the top: reading a manifest needs no torch

    missing = [c.name for c in RUNTIME if not c.optional and c.name not in m.components]
    missing += ["controlnet"] if m.controlnet and "controlnet" not in m.components else []  # its export has one
    if missing:
        raise EngineSetError(f"{Path(folder) / MANIFEST} lists no {', '.join(missing)} engine (a build that did "
                             f"not finish?); run the build again to finish it: {rebuild_command(m, folder)}")
    for e in m.components.values():
        path = Path(folder) / e.file
        if not path.is_file():
            raise EngineSetError(f"{path} is missing; rebuild: {rebuild_command(m, folder)}")
        if not (matches(e, path) if matches is not None else file_matches(path, e.sha256)):
            raise EngineSetError(
                f"{path} does not match its manifest (sha256 differs: corrupted, truncated or replaced); "
                f"rebuild it: {rebuild_command(m, folder)}")


def preflight(m: EngineManifest, folder: Path, *, flavor: str, installed: str, cc: str) -> None:
    """All checks the backends make before deserializing: flavor, library version, GPU, file hashes."""
    check_flavor(m, folder, flavor)
    check_library(m, folder, installed)
    check_device(m, folder, cc)
    check_engine_files(m, folder)


def check_shapes(m: EngineManifest, folder: Path, component: str, shapes: Mapping[str, Shape]) -> None:
    """Refuse a request whose input shapes fall outside `component`'s profile, saying what to rebuild."""
    from .components import graph_component

    entry, spec = m.components[component], graph_component(component, m.residuals)
    for t in spec.inputs:
        if t.name not in shapes:
            continue
        shape, (lo, _, hi) = shapes[t.name], entry.profiles[t.name]
        if len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            continue
        note = ""
        if t.axes.get(1) in ("T", "S") and len(shape) > 1 and len(lo) > 1 and not lo[1] <= shape[1] <= hi[1]:
            clip = m.variant.clip_tokens if t.axes[1] == "S" else 0  # joint sequence: 77 CLIP + T5 tokens
            note = (f" The text length is fixed at build time ({lo[1]}..{hi[1]} tokens): call with "
                    f"max_sequence_length={lo[1] - clip}.")
        raise EngineShapeError(
            f"{component} input {t.name!r} has shape {list(shape)}, outside {Path(folder) / entry.file}'s "
            f"profile {list(lo)}..{list(hi)}.{note} Rebuild engines that cover it: "
            f"{rebuild_command(m, folder, **_covering(m, component, t.axes, shape))}")


def _covering(m: EngineManifest, component: str, axes: Mapping[int, str], shape: Shape) -> dict[str, Any]:
    """Build options widened to include a request of `shape` (batch from dim 0, pixels from latents)."""
    shapes = m.shapes
    from .components import component as table_entry

    per_image = 2 if shapes.cfg and table_entry(component).cfg_doubled else 1
    batch = max(1, shape[0] // per_image) if shape else 1
    lo, hi = shapes.sizes[0], shapes.sizes[2]
    if axes.get(2) == "h" and len(shape) == 4:  # a latent: pixels = latent side x the VAE factor
        f = m.variant.vae.scale_factor
        lo, hi = min(lo, shape[2] * f, shape[3] * f), max(hi, shape[2] * f, shape[3] * f)
    b_lo, _, b_hi = shapes.batches
    return {"dynamic": True, "min_size": lo, "max_size": hi, "batch": (min(b_lo, batch), max(b_hi, batch))}


def _sibling_out(m: EngineManifest, folder: str | Path, cc: str) -> str:
    """engines/<variant>-<precision>-sm89 -> engines/<variant>-<precision>-sm120 (else the same)."""
    out, old = str(folder), m.build.gpu
    return out[: -len(old)] + cc if out.endswith(old) else out
