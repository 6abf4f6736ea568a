"""`sd35trt refit --engines DIR --onnx EXPORT_DIR`: swap new weights (a re-export with other
`--lora`s fused) into refittable engines, without rebuilding. Enterprise TensorRT only.

NEVER EXECUTED HERE: no machine of this workplace can install enterprise TensorRT, and
TensorRT-RTX refuses REFIT builds ahead of time on a CPU (export/trt_build.py). Written against the
documented TensorRT Python API ("Refitting an Engine"; Runtime.deserialize_cuda_engine,
ICudaEngine.refittable / serialize, Refitter(engine, logger) .refit_cuda_engine() /
.get_missing_weights(), OnnxParserRefitter(refitter, logger) .refit_from_file(path) / .num_errors
/ .get_error(i)). The checks before any TensorRT call (flavor, refit flag, same variant, which
graphs changed) are plain Python and tested.

Only the components whose graph hash differs from the one the engine was built from are refit;
the engine file is rewritten atomically and its manifest entry gets the new graph hash, so the
runtime's freshness check accepts it. The new export must have the same graph structure (same
precision, same components): only weights change with a LoRA, which is what refit allows.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path

from ..runtime.engine_manifest import EngineManifest
from ..runtime.errors import InvalidInputError
from ..runtime.files import atomic_write, sha256_file
from ..runtime.manifest import ExportManifest
from .engines import _onnx_digest
from .trt_build import EngineBuildError


def refit_plan(engine_dir: Path, onnx_dir: Path) -> tuple[EngineManifest, ExportManifest, dict[str, str]]:
    """(engine manifest, export manifest, {component: new graph hash}) of the engines to refit;
    InvalidInputError naming what stops a refit, before any TensorRT call."""
    engines, export = EngineManifest.load(engine_dir), ExportManifest.load(onnx_dir)
    if engines.flavor != "tensorrt":
        raise InvalidInputError(f"{engine_dir}: a {engines.flavor} engine set; refit needs enterprise TensorRT "
                                f"engines built with `sd35trt build --flavor tensorrt --refit`")
    if export.variant != engines.variant or export.precision != engines.precision:
        raise InvalidInputError(f"{onnx_dir} ({export.variant.name}, {export.precision}) is not the model of "
                                f"{engine_dir} ({engines.variant.name}, {engines.precision}); refit only swaps weights")
    todo = {}
    for comp, entry in engines.components.items():
        if comp not in export.components:
            raise InvalidInputError(f"{onnx_dir} has no {comp}; export every component the engine set holds")
        digest = _onnx_digest(onnx_dir, export, comp)
        if digest == entry.onnx_sha256:
            continue
        if not entry.flags.get("refit"):
            raise InvalidInputError(f"{engine_dir}/{entry.file} was built without --refit; rebuild it: "
                                    f"sd35trt build --onnx {onnx_dir} --out {engine_dir} --flavor tensorrt --refit ...")
        todo[comp] = digest
    return engines, export, todo


def refit_engines(engine_dir: str | Path, onnx_dir: str | Path) -> list[str]:
    """Refit every engine whose graph changed; returns the refit components (manifest saved after each)."""
    engine_dir, onnx_dir = Path(engine_dir), Path(onnx_dir)
    engines, export, todo = refit_plan(engine_dir, onnx_dir)
    if not todo:
        return []
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise EngineBuildError(f"refit needs enterprise TensorRT ({exc}); pip install tensorrt on a machine "
                               f"with the GPU the engines were built for") from exc
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    comps = dict(engines.components)
    for comp, digest in todo.items():
        path, onnx = engine_dir / comps[comp].file, onnx_dir / export.components[comp].file
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None or not engine.refittable:
            raise EngineBuildError(f"{path}: not a refittable engine for this TensorRT; rebuild with --refit")
        refitter = trt.Refitter(engine, logger)
        parser = trt.OnnxParserRefitter(refitter, logger)
        if not parser.refit_from_file(str(onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"refitting {path} from {onnx} failed: {errors or 'no error reported'}")
        missing = list(refitter.get_missing_weights())
        if missing or not refitter.refit_cuda_engine():
            raise EngineBuildError(f"refitting {path}: weights missing from {onnx}: {missing[:5]}; the graph "
                                   f"changed beyond its weights: rebuild the engine")
        serialized = engine.serialize()
        atomic_write(path, lambda f: f.write(memoryview(serialized)))
        comps[comp] = replace(comps[comp], onnx_sha256=digest, sha256=sha256_file(path), bytes=path.stat().st_size)
        engines = replace(engines, components=dict(comps))
        engines.save(engine_dir)
    return list(todo)
