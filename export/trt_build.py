"""ONNX -> serialized TensorRT / TensorRT-RTX engine: one code path, two builder flavors.

TensorRT-RTX builds ahead of time on the CPU (no GPU, no libcuda) for the compute capability we
name; enterprise TensorRT builds on, and for, the GPU it runs on. Networks are strongly typed:
precision comes from the ONNX graph (FP8 = QuantizeLinear/DequantizeLinear with a float8e4m3fn
zero point), never from builder flags. Everything the two flavors differ in is in `FLAVORS`.
"""

from __future__ import annotations

import importlib
import logging
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..runtime.engine_manifest import LIBRARIES, TRT_DTYPES, Library
from ..runtime.errors import InvalidInputError, Sd35Error
from ..runtime.files import atomic_write

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
MinOptMax = tuple[Shape, Shape, Shape]
Profiles = Mapping[str, MinOptMax]  # input name -> (min, opt, max)


class EngineBuildError(Sd35Error):
    """The ONNX could not be parsed or the engine not built; names the file and the fix."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style: "float32", "float16", "bfloat16", "float8_e4m3fn", "int64", ...
    shape: Shape  # -1 marks a dynamic dimension


@dataclass(frozen=True)
class BuildReport:
    flavor: str
    trt_version: str
    compute_capability: str
    engine_path: Path
    engine_bytes: int
    inputs: tuple[TensorSpec, ...]  # as the parsed network declares them
    outputs: tuple[TensorSpec, ...]
    profile: Mapping[str, MinOptMax]  # read back from the optimization profile; {} if all static
    parse_seconds: float
    build_seconds: float  # build_serialized_network alone
    peak_rss_mib: float  # process-wide peak (getrusage ru_maxrss): includes what ran before
    build_peak_rss_mib: float = 0.0  # resident set sampled during this parse + build (Linux /proc)
    flags: Mapping[str, Any] = field(default_factory=dict)  # refit, weight_streaming, opt_level


# --- the ONE place where the flavors differ ----------------------------------------------------
# Checked for tensorrt-rtx (executed on a CPU-only machine, tensorrt_rtx_bindings 1.7.1.116):
#   docstrings: IBuilderConfig.set_compute_capability / num_compute_capabilities; ComputeCapability
#   members (NONE, CURRENT, SM75, SM80, SM86, SM89, SM120, SM121: no SM90/SM100);
#   NetworkDefinitionCreationFlag.STRONGLY_TYPED; builder_optimization_level (0..5, 6 reads back 5);
#   BuilderFlag.REFIT ("Enable building a refittable engine"), BuilderFlag.WEIGHT_STREAMING
#   ("stream varying amounts of weights during Runtime"); IBuilderConfig.set_timing_cache, which
#   warns "Deprecated in TensorRT-RTX 1.2. Timing cache operations are no-ops in TensorRT-RTX";
#   runtime: Runtime.deserialize_cuda_engine, ICudaEngine.device_memory_size_v2 /
#   get_tensor_profile_shape / weight_streaming_budget_v2, create_execution_context(
#   ExecutionContextAllocationStrategy.USER_MANAGED), IExecutionContext.set_device_memory /
#   set_input_shape / set_tensor_address / get_tensor_shape / execute_async_v3.
#   Observed: WEIGHT_STREAMING builds on the CPU; REFIT, REFIT_IDENTICAL (with or without
#   STRIP_PLAN) fail there with Myelin "CHECK(status == CUDA_SUCCESS) failed" in compileGraph,
#   although the docs page "Refitting Engines" describes kREFIT for AOT builds.
#   TensorRT-RTX docs: "CPU-Only AOT and TensorRT-RTX Engines" (no compute capability set = portable
#   engine; CURRENT turns AOT off and needs a GPU), "Weight Streaming" (kWEIGHT_STREAMING at build,
#   weight_streaming_budget_v2 at run time), "Timing Cache Migration".
# Checked for tensorrt (enterprise; NEVER EXECUTED here, no installable TensorRT): TensorRT Python
#   API docs (docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/): Builder.html
#   (create_network(1 << int(STRONGLY_TYPED)); TensorRT 11 keeps the flag but ignores it),
#   BuilderConfig (set_flag(BuilderFlag.REFIT / WEIGHT_STREAMING), builder_optimization_level,
#   create_timing_cache(bytes) / set_timing_cache(cache, ignore_mismatch) / get_timing_cache()
#   .serialize()), RuntimeConfig.html (ExecutionContextAllocationStrategy.USER_MANAGED),
#   ExecutionContext.html (set_device_memory, set_input_shape, set_tensor_address,
#   execute_async_v3); "Refitting an Engine" (11.3: kREFIT may drop a GEMM bias, known issue);
#   no set_compute_capability: an engine is built for the GPU that builds it.
# Everything else (parse, strongly typed network, profiles, optimization level, weight streaming,
# serialization, the runtime calls) is shared.
def _rtx_check(cc: str) -> None:
    """TensorRT-RTX builds for any listed target on any host (CPU AOT)."""


def _rtx_target(trt: Any, config: Any, cc: str) -> None:
    config.num_compute_capabilities = 1
    if not config.set_compute_capability(trt.ComputeCapability.__members__[cc.upper()], 0):
        raise EngineBuildError(f"TensorRT-RTX rejected compute_capability={cc!r}")


def _enterprise_check(cc: str) -> None:
    """Enterprise TensorRT has no target setting: it builds for the GPU doing the build."""
    if cc == "current":
        return
    import torch  # lazy: only to read the local GPU's compute capability

    local = "sm%d%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if cc != local:
        raise EngineBuildError(
            f"flavor 'tensorrt' builds for the local GPU ({local or 'none visible'}), not "
            f"compute_capability={cc!r}; run the build on a {cc} GPU, pass {local!r}, or use "
            f"flavor='tensorrt-rtx' (CPU builds for sm75/80/86/89/120/121)")


def _enterprise_target(trt: Any, config: Any, cc: str) -> None:
    """Nothing to set: `_enterprise_check` already made sure the local GPU is the target."""


@dataclass(frozen=True)
class _Flavor:
    library: Library  # what the runtime loads (module, install hint): runtime/engine_manifest.py
    targets: tuple[str, ...]  # accepted compute_capability values
    check_target: Callable[[str], None]  # before any work
    set_target: Callable[[Any, Any, str], None]
    refused: Mapping[str, str] = field(default_factory=dict)  # build option -> why this flavor refuses it


FLAVORS: dict[str, _Flavor] = {
    "tensorrt-rtx": _Flavor(
        LIBRARIES["tensorrt-rtx"],
        ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121", "current"), _rtx_check, _rtx_target,
        refused={
            "refit": "TensorRT-RTX 1.7.1.116 fails REFIT builds ahead of time on a CPU (Myelin "
                     "'CHECK(status == CUDA_SUCCESS)'); build without --refit",
            "timing_cache": "TensorRT-RTX makes timing-cache operations no-ops (deprecated in "
                            "TensorRT-RTX 1.2); drop --timing-cache",
        }),
    "tensorrt": _Flavor(
        LIBRARIES["tensorrt"],
        ("sm80", "sm86", "sm89", "sm90", "sm100", "sm120", "current"), _enterprise_check,
        _enterprise_target),
}
# -------------------------------------------------------------------------------------------------

def check_build_options(flavor: str, compute_capability: str, *, refit: bool = False,
                        timing_cache: Path | None = None, opt_level: int | None = None) -> _Flavor:
    """Everything about the flavor, target and options that is checkable before any work."""
    if flavor not in FLAVORS:
        raise InvalidInputError(f"flavor={flavor!r} is unknown; use one of {sorted(FLAVORS)}")
    fl = FLAVORS[flavor]
    if compute_capability not in fl.targets:
        others = [f for f, o in FLAVORS.items() if compute_capability in o.targets]
        raise InvalidInputError(
            f"compute_capability={compute_capability!r} is not a {flavor} target; use one of "
            f"{list(fl.targets)}" + (f", or flavor {others[0]!r}" if others else ""))
    if opt_level is not None and not (type(opt_level) is int and 0 <= opt_level <= 5):
        raise InvalidInputError(f"opt_level={opt_level!r} must be an int in 0..5 (default 3)")
    for option, on in (("refit", refit), ("timing_cache", timing_cache is not None)):
        if on and option in fl.refused:
            raise InvalidInputError(f"{option}: {fl.refused[option]}")
    fl.check_target(compute_capability)
    return fl


def build_engine(onnx_path: Path, engine_path: Path, *, flavor: str = "tensorrt-rtx",
                 compute_capability: str = "sm89", profiles: Profiles | None = None,
                 opt_level: int | None = None, refit: bool = False, weight_streaming: bool = False,
                 timing_cache: Path | None = None) -> BuildReport:
    """Parse `onnx_path` by path (external data works), build, write `engine_path` atomically.
    `timing_cache` (enterprise) is read if it exists and written back after the build."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    fl = _check_args(onnx_path, flavor, compute_capability, profiles, opt_level, refit, timing_cache)
    try:
        trt = importlib.import_module(fl.library.module)
    except ImportError as exc:
        raise EngineBuildError(f"flavor {flavor!r} needs module {fl.library.module!r} ({exc}); "
                               f"{fl.library.install}") from exc
    logger = _recording_logger(trt)
    builder = trt.Builder(logger)
    typed = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    network = builder.create_network(1 << int(typed))
    if not network.get_flag(typed):
        raise EngineBuildError(f"{fl.library.module} {trt.__version__} made a weakly typed network")
    with _PeakRss() as rss:
        t0 = time.perf_counter()
        _parse(trt, network, logger, onnx_path)
        parse_seconds = time.perf_counter() - t0
        inputs = tuple(_spec(network.get_input(i)) for i in range(network.num_inputs))
        outputs = tuple(_spec(network.get_output(i)) for i in range(network.num_outputs))

        config = builder.create_builder_config()
        fl.set_target(trt, config, compute_capability)
        flags = _apply_flags(trt, config, opt_level, refit, weight_streaming)
        cache = _load_timing_cache(config, timing_cache)
        profile = _add_profile(builder, config, inputs, profiles or {}, onnx_path)

        logger.errors.clear()  # only errors logged by the build itself explain a failed build
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        build_seconds = time.perf_counter() - t0
    if serialized is None:
        raise EngineBuildError(
            f"building {onnx_path} for {compute_capability} with {fl.library.module} {trt.__version__} "
            f"failed: {'; '.join(logger.errors) or 'no error logged'}. Check that the graph's "
            f"dtypes/ops exist on {compute_capability} (FP8 needs sm89+) and the profile shapes")
    atomic_write(engine_path, lambda f: f.write(memoryview(serialized)))
    if cache is not None:
        atomic_write(Path(timing_cache), lambda f: f.write(memoryview(config.get_timing_cache().serialize())))
    return BuildReport(
        flavor=flavor, trt_version=trt.__version__, compute_capability=compute_capability,
        engine_path=engine_path, engine_bytes=engine_path.stat().st_size, inputs=inputs,
        outputs=outputs, profile=profile, parse_seconds=parse_seconds, build_seconds=build_seconds,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        build_peak_rss_mib=rss.peak_mib, flags=flags)


def _check_args(onnx_path: Path, flavor: str, cc: str, profiles: Profiles | None,
                opt_level: int | None, refit: bool, timing_cache: Path | None) -> _Flavor:
    """Everything checkable before importing TensorRT or reading the model."""
    fl = check_build_options(flavor, cc, refit=refit, timing_cache=timing_cache, opt_level=opt_level)
    for name, mom in (profiles or {}).items():
        if not _is_min_opt_max(mom):
            raise InvalidInputError(
                f"profiles[{name!r}]={mom!r} must be (min, opt, max) int shapes of one rank "
                f"with 0 <= min <= opt <= max in every dimension")
    if not onnx_path.is_file():
        raise EngineBuildError(f"ONNX file {onnx_path} does not exist; export the model first")
    return fl


def _apply_flags(trt: Any, config: Any, opt_level: int | None, refit: bool,
                 weight_streaming: bool) -> dict[str, Any]:
    if opt_level is not None:
        config.builder_optimization_level = opt_level
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if weight_streaming:  # needs a strongly typed network, which ours always is
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    return {"opt_level": config.builder_optimization_level, "refit": refit,
            "weight_streaming": weight_streaming}


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    """Attach a timing cache (the file's, or a new one); only flavors that honour it get here."""
    if path is None:
        return None
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        raise EngineBuildError(f"timing cache {path} does not match this TensorRT version or GPU; "
                               f"delete it (it is rebuilt) or pass another --timing-cache")
    return cache


def _is_min_opt_max(mom: object) -> bool:
    shapes = isinstance(mom, (tuple, list)) and len(mom) == 3 and all(
        isinstance(s, (tuple, list)) and all(type(d) is int for d in s) for s in mom)
    return shapes and len({len(s) for s in mom}) == 1 and all(
        0 <= a <= b <= c for a, b, c in zip(*mom))


def _recording_logger(trt: Any) -> Any:
    class _Recorder(trt.ILogger):
        """Forwards TensorRT messages to `logging` (DEBUG) and keeps the errors."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)
            log.debug("[%s] %s", getattr(severity, "name", severity), msg)

    return _Recorder()


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        raise EngineBuildError(
            f"TensorRT's ONNX parser rejected {onnx_path}: "
            f"{' | '.join(errors or logger.errors).rstrip('.')}. "
            f"Fix the export (opset 19+, supported ops/dtypes; run onnx.checker on it)")
    if network.num_outputs == 0:  # empty/text files "parse" fine into an empty network
        raise EngineBuildError(
            f"{onnx_path} parsed to a network without outputs: it is empty or not an ONNX model "
            f"({onnx_path.stat().st_size} bytes); re-export it")


def _spec(t: Any) -> TensorSpec:
    return TensorSpec(t.name, TRT_DTYPES.get(t.dtype.name, t.dtype.name.lower()), tuple(t.shape))


def _add_profile(builder: Any, config: Any, inputs: tuple[TensorSpec, ...], profiles: Profiles,
                 onnx_path: Path) -> dict[str, MinOptMax]:
    by_name = {t.name: t for t in inputs}
    unknown = sorted(set(profiles) - set(by_name))
    dynamic = [t for t in inputs if -1 in t.shape]
    missing = [f"{t.name}{list(t.shape)}" for t in dynamic if t.name not in profiles]
    if unknown or missing:
        raise EngineBuildError(
            f"profiles for {onnx_path} do not match its inputs {list(by_name)}: unknown "
            f"{unknown}, dynamic inputs without (min, opt, max) {missing}; pass "
            f"profiles={{name: (min_shape, opt_shape, max_shape)}} for every dynamic input")
    for name, mom in profiles.items():
        want = by_name[name].shape
        if any(len(s) != len(want) or any(w not in (-1, d) for w, d in zip(want, s)) for s in mom):
            raise EngineBuildError(
                f"profiles[{name!r}]={mom!r} does not fit input {name!r} of shape {list(want)} "
                f"in {onnx_path} (-1 = dynamic; repeat fixed dimensions as they are)")
    if not dynamic:
        return {}
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"TensorRT rejected the optimization profile {dict(profiles)}")
    return {n: tuple(tuple(int(d) for d in s) for s in profile.get_shape(n)) for n in profiles}


class _PeakRss:
    """Peak resident set of this process while the block runs, sampled every 20 ms on a helper
    thread from /proc/self/statm (ru_maxrss cannot be reset, so it would include earlier work)."""

    def __init__(self) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="sd35trt-rss", daemon=True)

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            try:
                with open("/proc/self/statm") as f:
                    rss = int(f.read().split()[1]) * page / 2**20
            except OSError:  # not Linux: fall back to the process-wide peak
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.peak_mib = max(self.peak_mib, rss)
            if self._stop.wait(0.02):
                return

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
