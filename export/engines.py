"""`sd35trt build`: an exported ONNX folder -> a TensorRT / TensorRT-RTX engine set + manifest.json.

Before any work: the flavor/target/options (`trt_build.check_build_options`), the precision policy
(FP8 only where the GPU has FP8) and the requested shapes are checked. Profiles come from the
variant config (`EngineShapes`). A component is rebuilt only when it is stale: its ONNX content,
flavor, library version, target, profiles or build flags changed, or its engine file no longer
has the recorded sha256. Engines are written atomically and the manifest is rewritten after each
one (a per-component commit): an interrupted build keeps the engines it finished, and the next run
removes the temp files it left. A set missing a component is refused by the runtime.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..runtime.checkpoint import Checkpoint
from ..runtime.components import COMPONENTS
from ..runtime.config import FAMILY_SAMPLING, VARIANTS, VariantConfig
from ..runtime.engine_manifest import FP8_GPUS, BuildArgs, EngineEntry, EngineManifest, EngineShapes
from ..runtime.errors import InvalidInputError
from ..runtime.files import MANIFEST, remove_temporaries, sha256_file
from ..runtime.manifest import ExportEntry, ExportManifest, HashCache
from .artifacts import copy_tokenizers
from .trt_build import BuildReport, EngineBuildError, build_engine, check_build_options

BF16_GPUS_EXCLUDED = ("sm75",)  # Turing has no bf16 tensor cores


@dataclass
class EngineRow:
    component: str
    file: str
    bytes: int
    precision: str
    target: str
    seconds: float  # parse + build (recorded at build time for unchanged engines)
    peak_rss_mib: float  # sampled during this component's parse + build
    status: str  # "built" | "unchanged"
    report: BuildReport | None = None  # None when unchanged


def variant_config(src: ExportManifest, family: str | None = None) -> VariantConfig:
    """The exported variant, or the same architecture as `family` (large <-> large-turbo)."""
    config = src.variant
    if family is None or family == config.family:
        return config
    if family not in FAMILY_SAMPLING:
        raise InvalidInputError(f"family={family!r} is unknown; use one of {sorted(FAMILY_SAMPLING)}")
    named = [n for n, v in VARIANTS.items() if v.transformer == config.transformer and v.family == family]
    name = named[0] if named else f"custom-{family}"
    return replace(config.with_family(family), name=name)


def default_out_dir(onnx_dir: str | Path, gpu: str, root: str | Path = "engines", family: str | None = None) -> Path:
    """engines/<variant>-<precision>[-<controlnet>]-<gpu>, read from the ONNX manifest (the
    ControlNet's folder or file name when the export has one, so it sits beside the plain set)."""
    src = ExportManifest.load(onnx_dir)
    net = f"-{Path(src.controlnet['source']).stem}" if src.controlnet else ""
    return Path(root) / f"{variant_config(src, family).name}-{src.precision}{net}-{gpu}"


def check_precision(src: ExportManifest, onnx_dir: Path, gpu: str) -> None:
    """FP8 engines only for GPUs with FP8 tensor cores; otherwise offer a 16-bit re-export."""
    redo = f"sd35trt export --model {src.source or 'MODEL'} --out {onnx_dir}-{{p}} --precision {{p}}"
    if src.precision == "fp8" and gpu not in FP8_GPUS:
        raise InvalidInputError(
            f"{onnx_dir / MANIFEST} is an FP8 export, but {gpu} has no FP8 tensor cores (FP8 needs one of "
            f"{', '.join(FP8_GPUS)}); re-export with --precision fp16|bf16 and build from that: "
            f"`{redo.format(p='fp16')}` (or `{redo.format(p='bf16')}`)")
    if "bf16" in (src.precision, src.dtype) and gpu in BF16_GPUS_EXCLUDED:
        raise InvalidInputError(f"{onnx_dir / MANIFEST} uses bf16, which {gpu} lacks; re-export with "
                                f"`{redo.format(p='fp16')}`")


def build_engines(onnx_dir: str | Path, out_dir: str | Path | None = None, *, gpu: str = "sm89",
                  flavor: str = "tensorrt-rtx", family: str | None = None, dynamic: bool = False,
                  batch: tuple[int, int] = (1, 1), min_size: int | None = None, max_size: int | None = None,
                  opt_level: int | None = None, refit: bool = False, weight_streaming: bool = False,
                  timing_cache: str | Path | None = None,
                  on_component: Callable[[str, str], None] | None = None) -> list[EngineRow]:
    """Build (or keep) the engines of every runtime component in `onnx_dir` (and its ControlNet,
    when exported with one) into `out_dir` (default engines/<variant>-<precision>-<gpu>). `family` overrides the exported one (a real
    Large Turbo folder exports as "large"). `on_component(component, "build"|"keep")` is called
    before each one (progress)."""
    onnx_dir = Path(onnx_dir)
    if gpu == "current" or not isinstance(gpu, str) or not gpu.startswith("sm"):
        raise InvalidInputError(f"gpu={gpu!r}: name the target compute capability, e.g. sm89 (RTX 40xx, L40S), "
                                f"sm90 (H100), sm120 (RTX 50xx)")
    fl = check_build_options(flavor, gpu, refit=refit, timing_cache=timing_cache, opt_level=opt_level)
    src = ExportManifest.load(onnx_dir)
    check_precision(src, onnx_dir, gpu)
    config = variant_config(src, family)
    shapes = EngineShapes.for_variant(config, dynamic, tuple(batch), min_size, max_size)
    out = Path(out_dir) if out_dir is not None else default_out_dir(onnx_dir, gpu, family=family)
    residuals = int(src.controlnet["residuals"]) if src.controlnet else None  # `export --controlnet`
    comps = [c for c in (*COMPONENTS, *(["controlnet"] if residuals else [])) if c in src.components]
    lib = fl.library
    version = _library_version(lib.module, lib.install, flavor)
    flags = {"refit": refit, "weight_streaming": weight_streaming, "opt_level": opt_level}
    build = BuildArgs(onnx=str(onnx_dir), out=str(out), gpu=gpu, flavor=flavor, family=family, dynamic=dynamic,
                      batch=list(batch), min_size=shapes.sizes[0] if dynamic else None,
                      max_size=shapes.sizes[2] if dynamic else None, opt_level=opt_level, refit=refit,
                      weight_streaming=weight_streaming, timing_cache=str(timing_cache) if timing_cache else None)
    profiles = shapes.profiles(config, residuals)
    remove_temporaries(out)
    old = EngineManifest.load_existing(out)
    copy_tokenizers(Checkpoint.open(onnx_dir), out)

    def commit() -> None:  # the manifest lists exactly the finished, current engines
        EngineManifest(config, src.precision, src.dtype, flavor, lib.module, version, gpu, shapes, build,
                       dict(entries), controlnet=src.controlnet).save(out)

    wants = {comp: _json({"onnx_sha256": _onnx_digest(onnx_dir, src, comp), "flavor": flavor,
                          "library_version": version, "target": gpu, "profiles": profiles[comp], "flags": flags})
             for comp in comps}
    entries = {c: old.components[c] for c in comps
               if old is not None and c in old.components and old.components[c].is_fresh(out, wants[c])}
    commit()  # stale entries leave the manifest before their engines are replaced
    rows = []
    for comp in comps:
        if comp in entries:
            if on_component:
                on_component(comp, "keep")
            e = entries[comp]
            rows.append(EngineRow(comp, e.file, e.bytes, e.precision, e.target, e.parse_seconds + e.build_seconds,
                                  e.peak_rss_mib, "unchanged"))
            continue
        if on_component:
            on_component(comp, "build")
        report = build_engine(onnx_dir / src.components[comp].file, out / f"{comp}.engine", flavor=flavor,
                              compute_capability=gpu, profiles=profiles[comp], opt_level=opt_level, refit=refit,
                              weight_streaming=weight_streaming, timing_cache=timing_cache)
        entries[comp] = e = _entry(report, wants[comp], src.components[comp], lib.module)
        commit()
        rows.append(EngineRow(comp, e.file, e.bytes, e.precision, gpu, e.parse_seconds + e.build_seconds,
                              e.peak_rss_mib, "built", report))
    return rows


def _library_version(module: str, install: str, flavor: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError as exc:
        raise EngineBuildError(f"flavor {flavor!r} needs module {module!r} ({exc}); {install}") from exc


def _json(doc: Any) -> Any:
    """As it reads back from manifest.json (tuples become lists), so entries compare equal."""
    return json.loads(json.dumps(doc))


def _onnx_digest(onnx_dir: Path, src: ExportManifest, comp: str) -> str:
    """Content hash of a component's graph and its external data; refuses a graph that no longer
    matches the export manifest (edited or truncated after export)."""
    entry, cache = src.components[comp], HashCache(onnx_dir)
    known = {n: d for n, _ in entry.hashed_files() if (d := cache.get(n)) is not None}
    return entry.content_digest(onnx_dir, f"re-export it: {src.export_command(onnx_dir)}", known)


def _entry(report: BuildReport, want: dict[str, Any], src: ExportEntry, module: str) -> EngineEntry:
    return EngineEntry(**want, file=report.engine_path.name, sha256=sha256_file(report.engine_path),
                       bytes=report.engine_bytes, precision=src.precision, library=module, onnx_file=src.file,
                       inputs=_json([asdict(t) for t in report.inputs]), outputs=_json([asdict(t) for t in report.outputs]),
                       built_profiles=_json(report.profile), applied_flags=dict(report.flags),
                       parse_seconds=round(report.parse_seconds, 3), build_seconds=round(report.build_seconds, 3),
                       peak_rss_mib=round(report.build_peak_rss_mib, 1))


def format_table(rows: list[EngineRow]) -> str:
    head = (f"{'component':<12} {'engine':<20} {'size':>10} {'precision':>9} {'target':>6} "
            f"{'build':>8} {'peak RSS':>10} {'status':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.component:<12} {r.file:<20} {r.bytes / 2**20:>8.2f}MB {r.precision:>9} {r.target:>6} "
                     f"{r.seconds:>7.1f}s {r.peak_rss_mib / 1024:>7.2f}GiB {r.status:>9}")
    return "\n".join(lines)


__all__ = ["EngineRow", "build_engines", "check_precision", "default_out_dir", "format_table", "variant_config"]
