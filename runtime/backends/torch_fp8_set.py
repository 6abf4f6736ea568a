"""`torch-fp8` over an engine set (`sd35trt build --flavor torch-fp8`): FP8 weights read as the
backend runs them, torch's compile artifacts loaded before compiling, so a fresh process starts
without compiling (runtime/torch_engine_set.py has the layout and the reasons).

`Pipeline.from_pretrained(engine_dir)` reaches it through the flavor in the manifest; the
`torch-fp8` factory sends a checkpoint to `TorchFP8Backend` and an engine set here.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import torch

from ..config import VariantConfig
from ..engine_manifest import EngineManifest, EngineSetError, device_cc
from ..errors import InvalidInputError
from ..models.flash_attention import fa4_import_error
from ..models.fp8 import load_amax
from ..models.fp8_gemm import GemmChoice, choose_gemm, quack_version, use_quack
from ..models.fp8_text import TEXT_ENCODERS, compile_text_encoders
from ..models.quack_kernels import install_kernels
from ..torch_engine_set import CACHE, CALIBRATION, check_set, installed_versions, is_torch_set, load_cache, load_state
from ..torch_engine_set import set_components, skeleton, start_state
from .base import BackendBase, Limits
from .fp8_fusions import apply_fusions, check_fusions, fusion_options
from .torch_backend import TorchBackend
from .torch_fp8 import TorchFP8Backend, compile_options

MODES = (False, True, "default", "reduce-overhead")  # compile_options' modes (checked before its import)
TEXT_EAGER = "eager"  # a text encoder's `compile` flag in sets: run eagerly (compile_set_modules says why)
COMPILE_SCOPES = ("model", "blocks")  # compile_mmdit's scopes: the whole step's graph, or one per joint block


class TorchFP8SetBackend(TorchBackend):
    """Loads a torch-fp8 engine set: checks it (before any weights), loads the compile artifacts,
    the weights onto the GPU, compiles the MMDiT (fullgraph, the set's mode) and the VAE decoder
    as the build did. `timings` says where the load went (seconds)."""

    name = "torch-fp8"

    def __init__(self, checkpoint: Any, config: VariantConfig, device: str | torch.device | None = None,
                 load_t5: bool = True, compile: bool | str | None = None) -> None:
        m: EngineManifest = checkpoint.manifest
        self.manifest, self.path, self.dtype = m, Path(checkpoint.path), torch.bfloat16
        self.timings: dict[str, float] = {}
        self.quack_kernels_installed = 0
        mode = m.components["transformer"].flags.get("compile", "reduce-overhead") if compile is None else compile
        if not isinstance(mode, (bool, str)) or mode not in MODES:
            compile_options(mode)  # raises, naming the modes (before its inductor import, which overlaps the read)
        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda" and mode is not False:
            raise EngineSetError(f"{self.path}: a torch-fp8 engine set's compiled artifacts run on the CUDA GPU it "
                                 f"was built for ({m.target}), not on {self.device}; pass compile=False to run its "
                                 f"weights eagerly there")
        fa4 = threading.Thread(target=fa4_import_error, daemon=True)  # its import overlaps the weights' read
        with self._timed("check_s"):
            cc = device_cc(self.device) if self.device.type == "cuda" else None
            check_set(m, self.path, cc, installed_versions())  # cc None: eager weights only, nothing compiled
        if self.device.type == "cuda":
            fa4.start()
        options, kernels = self._load(config, load_t5, mode)
        self.gemm = set_gemm(self.path, m.components["transformer"].flags, options is not None, self.device)
        use_quack(self.modules["transformer"], self.gemm.name == "quack")  # before the fusions (quack-qknorm)
        if self.gemm.name == "quack" and kernels:
            with self._timed("quack_kernels_s"):  # the build's compiled kernels: quack loads, not compiles, them
                self.quack_kernels_installed = install_kernels(kernels, str(self.path / m.components[CACHE].file))
        options = self._fusions(options)
        with self._timed("attention_s"):
            if fa4.ident is not None:  # started (CUDA)
                fa4.join()
            self._choose_attention()  # FA4 on sm90/sm100 when it imports, as the build chose
        built = m.components["transformer"].flags.get("attention")
        if options is not None and built and built != self.attention.name:  # other graphs than the artifacts'
            raise EngineSetError(f"{self.path}: the set was compiled with attention {built!r}, this process would "
                                 f"run {self.attention.name!r} ({self.attention.reason}); install what the build "
                                 f"had (`pip install 'sd35trt[hopper]'`) or rebuild the set here")
        if options is not None:
            with self._timed("compile_wrap_s"):
                compile_set_modules(self.modules, m.components["transformer"].flags, options,
                                    [c for c in self.modules if m.components[c].flags.get("compile") == "default"])
        self.bind()

    def _fusions(self, options: dict | None) -> dict | None:
        """The build's opt-in step fusions (flag `fusions`, fp8_fusions.py; absent = none) applied to the
        MMDiT as the build's warm-up applied them, and their inductor options added."""
        names = self.manifest.components["transformer"].flags.get("fusions", ())
        try:
            fusions = check_fusions(tuple(names))
        except InvalidInputError as exc:
            raise EngineSetError(f"{self.path}: the set was built with step fusions this runtime does not know "
                                 f"({exc}); rebuild it with this version") from exc
        apply_fusions(self.modules["transformer"], fusions)
        return None if options is None else {**options, **fusion_options(fusions)}

    @contextmanager
    def _timed(self, key: str):
        t = time.perf_counter()
        yield
        self.timings[key] = round(time.perf_counter() - t, 3)

    def _load(self, config: VariantConfig, load_t5: bool, mode: bool | str) -> tuple[dict | None, dict[str, bytes]]:
        """Every component's module, its skeleton filled from its file in one verified read, and
        the compile artifacts loaded; returns the compile options and quack's kernels from the
        compile-cache file (models/quack_kernels.py; installed once the GEMM is known). All files' reads are queued at
        once on one pool (no file waits for the tail of the one before) and run while this thread
        imports the compiler, loads the artifacts and makes the skeletons."""
        from concurrent.futures import ThreadPoolExecutor

        from ..set_reader import _workers

        m = self.manifest
        comps = set_components(m, load_t5)
        self.modules = {}
        t = time.perf_counter()
        with ThreadPoolExecutor(_workers()) as pool:
            reads = {c: start_state(self.path / m.components[c].file, self.device,
                                    m.components[c].flags.get("sha256_chunks"), pool) for c in comps}
            try:
                with self._timed("compiler_import_s"):  # under the reads: importing it first was 1.2 s
                    options = compile_options(mode)      # slower from disk (BENCHMARKS.md, sixth session)
                with self._timed("cache_s"):
                    blob, kernels = load_cache(self.path / m.components[CACHE].file) if options is not None \
                        else (b"", {})
                    if blob:  # empty while the build itself warms the set up
                        torch.compiler.load_cache_artifacts(blob)
                with self._timed("skeletons_s"):
                    amax = load_amax(self.path / CALIBRATION)
                    shells = {c: skeleton(c, config, m.components[c].flags, amax) for c in comps}
                t_wait = time.perf_counter()
                for comp in comps:
                    self.modules[comp] = load_state(shells[comp], self.path / m.components[comp].file, self.device,
                                                    read=reads.pop(comp))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.timings["weights_wait_s"] = round(time.perf_counter() - t_wait, 3)
            finally:
                for wait in reads.values():  # a failure above: let the queued reads finish and close their files
                    try:
                        wait()
                    except Exception:
                        pass
        self.timings["weights_s"] = round(time.perf_counter() - t, 3)  # reads start -> all on the device
        self.fp8_layers = m.components["transformer"].flags.get("fp8_layers", 0)
        return options, kernels


def set_gemm(path: Path, flags: Any, compiled: bool, device: torch.device, installed: str | None = None,
             choice: GemmChoice | None = None) -> GemmChoice:
    """The FP8 GEMM a set runs. Compiled: the build's (flag `gemm`; absent = cuBLAS, as sets were
    built before the choice existed), refused when this process cannot run it or has another quack
    than the build (the artifacts hold its kernels' calls). Eager: this device's own choice.
    `installed` / `choice` default to this process's quack version and choice (tests pass them)."""
    built = flags.get("gemm", "cublas")
    if not compiled:
        return choice or choose_gemm(device)
    if built == "cublas":
        return GemmChoice("cublas", f"{path}: the set was compiled with cuBLAS GEMMs")
    choice = choice or choose_gemm(device)
    installed = installed if installed is not None else quack_version()
    if choice.name != built or installed != flags.get("quack_version"):
        why = choice.reason or f"quack {installed} is installed, the build had {flags.get('quack_version')}"
        raise EngineSetError(f"{path}: the set was compiled with {built} FP8 GEMMs (quack "
                             f"{flags.get('quack_version')}), which this process cannot run ({why}); install what "
                             f"the build had (`pip install 'sd35trt[hopper]'`) or rebuild the set here")
    return choice


def compile_set_modules(modules: dict[str, torch.nn.Module], flags: Any, options: dict[str, Any],
                        text: Iterable[str] = ()) -> None:
    """Wrap the MMDiT and the VAE decoder in `modules` as the set's build did: the MMDiT in the
    transformer entry's `compile_scope` (a set without one was built whole), the decoder channels-last;
    the text encoders named in `text` compiled in place (inductor's default, no CUDA graphs:
    models/fp8_text.py). Sets record each encoder's mode: "default" (compiled, sets of 2026-12-01)
    or TEXT_EAGER (since: dynamo's first trace of the three took 23 s of a fresh process's first image)."""
    modules["transformer"] = compile_mmdit(modules["transformer"], flags.get("compile_scope", "model"), options=options)
    modules["vae_decoder"] = torch.compile(modules["vae_decoder"].to(memory_format=torch.channels_last))
    compile_text_encoders(modules, [n for n in TEXT_ENCODERS if n in text])


def compile_mmdit(mmdit: torch.nn.Module, scope: str, **compile_args: Any) -> torch.nn.Module:
    """torch.compile(fullgraph) of the MMDiT: `scope="model"` one graph of the whole step;
    `"blocks"` each joint block compiled in place (regional compilation: the blocks share their
    code, so dynamo traces one block per distinct kind, 2 for Large, instead of the whole graph;
    the rest of the step stays eager)."""
    if scope == "blocks":
        for block in mmdit.transformer_blocks:
            _compile_block(block, **compile_args)
        return mmdit
    if scope != "model":
        raise InvalidInputError(f"compile_scope={scope!r}: use one of {', '.join(COMPILE_SCOPES)}")
    return torch.compile(mmdit, fullgraph=True, **compile_args)


def _compile_block(block: torch.nn.Module, **compile_args: Any) -> None:
    """`block.compile(fullgraph=True, ...)` (the module's own compiled call, so every block of a kind
    shares dynamo's trace and the state dict keeps its names), its outputs cloned on the way out.
    With CUDA graphs (reduce-overhead) all blocks replay one compiled function, each call a new
    cudagraph-tree root over one memory pool: block i+1's replay overwrites block i's outputs while
    they are its inputs ("accessing tensor output of CUDAGraphs that has been overwritten"). A clone
    outside the compiled region (x [B, N, D] and ctx [B, 77+T, D]: ~2 x 43 MB a block at 1024²) is
    the input of the next block instead."""
    compiled = torch.compile(block._call_impl, fullgraph=True, **compile_args)

    def call(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in compiled(*args, **kwargs))

    block._compiled_call_impl = call  # what nn.Module.compile sets; __call__ runs it in place of _call_impl


class TorchFP8Factory:
    """The `torch-fp8` backend factory: an engine set of that flavor -> `TorchFP8SetBackend`, a
    checkpoint -> `TorchFP8Backend` (which needs `calibration=`)."""

    limits = Limits()
    # What memory modes ask of the backend class (runtime/memory.py `prepare`): a checkpoint's
    # TorchFP8Backend loads on the host and moves its weights per stage (an engine set refuses load_device).
    stages_weights = True
    weight_handles = TorchFP8Backend.weight_handles

    def __call__(self, path: Any, config: VariantConfig, **options: Any):
        if is_torch_set(getattr(path, "manifest", None)):
            extra = sorted(set(options) - {"device", "load_t5", "compile"})
            if extra:
                raise InvalidInputError(f"{', '.join(extra)} do not apply to a torch-fp8 engine set (its weights, "
                                        f"calibration and precision are fixed at build): drop them")
            return TorchFP8SetBackend(path, config, **options)
        return TorchFP8Backend(path, config, **options)

    def limits_for(self, path: Any, config: VariantConfig) -> Limits:
        return BackendBase.limits

    def check_controlnet(self, path: Any, config: VariantConfig, paths: Any) -> None:
        """Any ControlNet that fits the MMDiT runs (checked when it loads)."""


torch_fp8_factory = TorchFP8Factory()
