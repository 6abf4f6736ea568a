"""`torch-fp8` over an engine set (`sd35trt build --flavor torch-fp8`): FP8 weights read as the
backend runs them, torch's compile artifacts loaded before compiling, so a fresh process starts
without compiling (runtime/torch_engine_set.py has the layout and the reasons).

`Pipeline.from_pretrained(engine_dir)` reaches it through the flavor in the manifest; the
`torch-fp8` factory sends a checkpoint to `TorchFP8Backend` and an engine set here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..config import VariantConfig
from ..engine_manifest import EngineManifest, EngineSetError, device_cc
from ..errors import InvalidInputError
from ..models.fp8 import load_amax
from ..torch_engine_set import CACHE, CALIBRATION, check_set, installed_versions, is_torch_set, load_cache, load_state
from ..torch_engine_set import set_components, skeleton
from .base import BackendBase, Limits
from .torch_backend import TorchBackend
from .torch_fp8 import TorchFP8Backend, compile_options


class TorchFP8SetBackend(TorchBackend):
    """Loads a torch-fp8 engine set: checks it (before any weights), loads the compile artifacts,
    the weights onto the GPU, compiles the MMDiT (fullgraph, the set's mode) and the VAE decoder
    as the build did. `timings` says where the load went (seconds)."""

    name = "torch-fp8"

    def __init__(self, checkpoint: Any, config: VariantConfig, device: str | torch.device | None = None,
                 load_t5: bool = True, compile: bool | str | None = None) -> None:
        t0 = time.perf_counter()
        m: EngineManifest = checkpoint.manifest
        folder = Path(checkpoint.path)
        mode = m.components["transformer"].flags.get("compile", "reduce-overhead") if compile is None else compile
        options = compile_options(mode)
        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda" and options is not None:
            raise EngineSetError(f"{folder}: a torch-fp8 engine set's compiled artifacts run on the CUDA GPU it was "
                                 f"built for ({m.target}), not on {self.device}; pass compile=False to run its "
                                 f"weights eagerly there")
        cc = device_cc(self.device) if self.device.type == "cuda" else None
        check_set(m, folder, cc, installed_versions())  # cc None: eager weights only, no arch/version bound
        self.dtype, self.manifest, self.path = torch.bfloat16, m, folder
        self.timings: dict[str, float] = {"check_s": time.perf_counter() - t0}
        t = time.perf_counter()
        blob = load_cache(folder / m.components[CACHE].file) if options is not None else b""
        if blob:  # empty while the build itself warms the set up
            torch.compiler.load_cache_artifacts(blob)
        self.timings["cache_s"] = time.perf_counter() - t
        t = time.perf_counter()
        amax = load_amax(folder / CALIBRATION)
        self.modules = {}
        for comp in set_components(m, load_t5):
            entry = m.components[comp]
            self.modules[comp] = load_state(skeleton(comp, config, entry.flags, amax), folder / entry.file, self.device,
                                            entry.flags.get("sha256_chunks"))
        self.fp8_layers = m.components["transformer"].flags.get("fp8_layers", 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings["weights_s"] = time.perf_counter() - t
        self._choose_attention()  # FA4 on sm90/sm100 when it imports, as the build chose
        built = m.components["transformer"].flags.get("attention")
        if options is not None and built and built != self.attention.name:  # other graphs than the artifacts'
            raise EngineSetError(f"{folder}: the set was compiled with attention {built!r}, this process would run "
                                 f"{self.attention.name!r} ({self.attention.reason}); install what the build had "
                                 f"(`pip install 'sd35trt[hopper]'`) or rebuild the set here")
        if options is not None:
            self.modules["transformer"] = torch.compile(self.modules["transformer"], fullgraph=True, options=options)
            vae = self.modules["vae_decoder"].to(memory_format=torch.channels_last)
            self.modules["vae_decoder"] = torch.compile(vae)
        self.bind()


class TorchFP8Factory:
    """The `torch-fp8` backend factory: an engine set of that flavor -> `TorchFP8SetBackend`, a
    checkpoint -> `TorchFP8Backend` (which needs `calibration=`)."""

    limits = Limits()

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


torch_fp8_factory = TorchFP8Factory()
