"""The `torch-fp8` engine set (`sd35trt build --flavor torch-fp8`): FP8 weights, their calibration
and torch's compiled artifacts for one GPU architecture, read and checked here.

engines/<variant>-fp8-<gpu>-torch/ holds
  manifest.json               the engine-set manifest (runtime/engine_manifest.py), flavor torch-fp8:
                              library = torch and its version, target = the GPU arch, every file's
                              sha256, and per component the Triton / FlashAttention-4 versions and
                              the compile mode the artifacts were made with;
  <component>.safetensors     each runtime component's state dict as the backend runs it (MMDiT
                              Linears already FP8 with their static scales, T5-XXL's FP8 too);
  calibration/amax.safetensors the calibration the FP8 MMDiT was made from (t5_amax.safetensors
                              beside it: T5-XXL's, when its GEMMs are FP8; t5's flags say which);
  compile_cache.safetensors   torch's compile artifacts (`torch.compiler.save_cache_artifacts`:
                              inductor's compiled graphs, their Triton kernels and autotune results)
                              as one uint8 tensor, loaded with `load_cache_artifacts` before compiling,
                              and quack's compiled GEMM kernels when the set runs them
                              (models/quack_kernels.py), put into quack's cache as the set loads;
  tokenizer*/, model_index.json.

Why the inductor artifacts and not AOTInductor: they are the very graphs the backend's
`torch.compile(fullgraph=True, mode="reduce-overhead")` makes, so CUDA-graph replay and the
FlashAttention-4 custom op (resolved by name in the loading process) hold unchanged, and the
weights stay in our own safetensors; an AOTInductor package would carry its own copy of 8 GB of
constants and need a C++ proxy for the Python custom op, without CUDA graphs. The artifacts are
only valid for the torch/Triton/FA4 versions and GPU arch that made them: the manifest records
those and `check_set` refuses anything else before a byte of weights is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .components import RUNTIME
from .config import VariantConfig
from .engine_manifest import (EngineEntry, EngineManifest, EngineSetError, check_device, check_engine_files,
                              check_flavor, check_library, rebuild_command)
from .files import MANIFEST, atomic_write
from .set_reader import chunk_hashes, read_verified, start_verified

FLAVOR = "torch-fp8"
BF16 = torch.bfloat16  # what every module of a set computes in (FP8 GEMMs write bf16)
QUACK = "quack/"  # the compile-cache file's tensors that are quack kernels: quack/<fingerprint>/<key>.o
CACHE = "compile_cache"  # the manifest entry of the compile artifacts (not a runtime component)
CALIBRATION = "calibration/amax.safetensors"
# Versions beside torch that compiled artifacts depend on (distribution name -> manifest flag).
VERSIONED = {"triton": "triton_version", "flash-attn-4": "fa4_version", "nvidia-cutlass-dsl": "cutlass_dsl_version"}


def file_name(component: str) -> str:
    return f"{component}.safetensors"


def default_dir(variant: str, gpu: str, root: str | Path = "engines") -> Path:
    """engines/<variant>-fp8-<gpu>-torch (beside the TensorRT sets' <variant>-fp8-<gpu>)."""
    return Path(root) / f"{variant}-fp8-{gpu}-torch"


def installed_versions() -> dict[str, str | None]:
    """The versions compiled artifacts depend on, as installed here (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"torch_version": torch.__version__}
    for dist, key in VERSIONED.items():
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    return out


def is_torch_set(manifest: Any) -> bool:
    return isinstance(manifest, EngineManifest) and manifest.flavor == FLAVOR


def check_set(m: EngineManifest, folder: Path, cc: str | None, versions: Mapping[str, str | None]) -> None:
    """Refuse a stale or foreign set before loading: flavor, torch version, GPU arch, every file's
    sha256 chunks (`check_files`), then the Triton / FA4 / CuTe DSL versions the artifacts
    were compiled with. `cc` None (weights run eagerly, off the GPU): only the flavor and the
    files are checked, as nothing compiled is used. Every refusal carries the rebuild command."""
    if CACHE not in m.components:
        raise EngineSetError(f"{Path(folder) / MANIFEST} lists no compile artifacts (a build that did not "
                             f"finish?); run the build again: {rebuild_command(m, folder)}")
    check_flavor(m, folder, FLAVOR)
    if cc is not None:
        check_library(m, folder, versions["torch_version"])
        check_device(m, folder, cc)
    check_files(m, folder)
    if cc is None:
        return
    built = m.components[CACHE].flags
    for key in VERSIONED.values():
        if built.get(key) != versions.get(key):
            name = key.removesuffix("_version")
            raise EngineSetError(
                f"{Path(folder) / m.components[CACHE].file} was compiled with {name} {built.get(key)}, but "
                f"{versions.get(key)} is installed here: compiled artifacts only load with the versions that "
                f"made them. Rebuild the set here: {rebuild_command(m, folder)}")


def check_files(m: EngineManifest, folder: Path) -> None:
    """Every runtime component and the artifacts are listed and present at their recorded size, the
    artifacts match their chunk hashes; the weight files are verified while they are read, in the
    same pass (`load_state`). Refusals carry the rebuild command."""
    def matches(e: EngineEntry, path: Path) -> bool:
        hashed_now = e is m.components[CACHE]  # the weight files are hashed as they are read
        return path.stat().st_size == e.bytes and not (hashed_now and chunk_hashes(path) != e.flags.get("sha256_chunks"))

    check_engine_files(m, folder, matches)


def save_state(module: nn.Module, path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    """`module`'s state dict as safetensors, atomically. FP8 weights stored [K, N] column-major
    (`weight_t`, a transposed view) are written as their contiguous [N, K] transpose, and tensors
    sharing storage (T5's tied embedding) once, the aliases named in the metadata."""
    from safetensors.torch import save

    state, aliases, seen = {}, {}, {}
    for key, t in module.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ptr in seen:
            aliases[key] = seen[ptr]
            continue
        seen[ptr] = key
        state[key] = (t.t() if key.endswith("weight_t") else t).contiguous()
    meta = {**(metadata or {}), "aliases": json.dumps(aliases)}
    blob = save(state, metadata=meta)
    return atomic_write(path, lambda f: f.write(blob))


def _refuse(why: str) -> EngineSetError:
    return EngineSetError(f"{why}; rebuild the engine set")


def start_state(path: Path, device: torch.device, chunks: list[str] | None, pool) -> Callable[[], tuple]:
    """Queue the verified read of a set file on `pool` (set_reader.start_verified): `wait()` gives
    what `load_state(..., read=wait)` fills a module with."""
    return start_verified(path, chunks, device, _refuse, pool)


def load_state(module: nn.Module, path: Path, device: torch.device, chunks: list[str] | None = None,
               read: Callable[[], tuple] | None = None) -> nn.Module:
    """Load what `save_state` wrote into `module` (made on the meta device, converted like the
    saved one), strictly, the file read once straight onto `device` and checked against its
    manifest `chunks` hashes on the way (set_reader; `read`: a read `start_state` queued);
    non-persistent buffers the file cannot hold (position ids) are rebuilt there."""
    state, meta = read() if read is not None else read_verified(path, chunks, device, _refuse)
    aliases = json.loads(meta.get("aliases", "{}"))
    state = {k: (t.t() if k.endswith("weight_t") else t) for k, t in state.items()}
    state.update({k: state[v] for k, v in aliases.items()})
    own = set(module.state_dict())
    if own != set(state):
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        raise EngineSetError(f"{path} does not match the module it should fill (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); rebuild the engine set")
    module.load_state_dict(state, strict=True, assign=True)
    for mod in module.modules():
        for key, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:  # non-persistent: position ids, dtype probes
                fresh = (torch.arange(buf.shape[-1], device=device).expand(buf.shape) if key == "position_ids"
                         else torch.empty(buf.shape, dtype=buf.dtype, device=device))
                mod.register_buffer(key, fresh, persistent=False)
    return module.eval().requires_grad_(False)


def save_cache(blob: bytes, path: Path, metadata: Mapping[str, str] | None = None,
               kernels: Mapping[str, bytes] | None = None) -> Path:
    """torch's compile artifacts (bytes) as one uint8 tensor in safetensors (no pickle on disk), and
    quack's compiled kernels beside them, one uint8 tensor each named `quack/<fingerprint>/<key>.o`
    (models/quack_kernels.py)."""
    from safetensors.torch import save

    def u8(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.zeros(0, dtype=torch.uint8)

    tensors = {"artifacts": u8(blob), **{f"{QUACK}{name}": u8(data) for name, data in (kernels or {}).items()}}
    out = save(tensors, metadata=dict(metadata or {}))
    return atomic_write(path, lambda f: f.write(out))


def load_cache(path: Path) -> tuple[bytes, dict[str, bytes]]:
    """(torch's artifacts, quack's kernels by `<fingerprint>/<key>.o`) of a compile-cache file; a
    kernel name of another form is refused (EngineSetError naming the file)."""
    from safetensors.torch import load_file

    from .models.quack_kernels import check_names

    tensors = load_file(str(path))
    kernels = {k.removeprefix(QUACK): t.numpy().tobytes() for k, t in tensors.items() if k.startswith(QUACK)}
    try:
        check_names(list(kernels), str(path))
    except ValueError as exc:
        raise EngineSetError(f"{exc}; rebuild the set") from exc
    return tensors["artifacts"].numpy().tobytes(), kernels


def skeleton(component: str, config: VariantConfig, flags: Mapping[str, Any], amax: Mapping[str, float]) -> nn.Module:
    """The component's module on the meta device, converted as the set stores it (FP8 MMDiT from
    the calibration, T5 as its flags say), ready for `load_state`."""
    from .models.fp8 import fp8_weights_only, to_fp8
    from .models.fp8_text import placeholder_amax, t5_to_fp8
    from .models.loader import ClipGraph, T5Graph
    from .models.mmdit import MMDiT, use_sigmoid_gelu
    from .models.vae import VaeDecoder, VaeEncoder

    with torch.device("meta"):
        if component == "transformer":
            model = to_fp8(MMDiT(config.transformer).to(BF16), amax, fast_accum=bool(flags.get("fast_accum", True)))
            use_sigmoid_gelu(model, bool(flags.get("sigmoid_gelu", True)))
            return model
        if component in ("vae_decoder", "vae_encoder"):
            return (VaeDecoder if component == "vae_decoder" else VaeEncoder)(config.vae).to(BF16)
        import transformers

        hf = flags["hf_config"]
        if component == "t5":
            model = transformers.T5EncoderModel(transformers.T5Config.from_dict(hf)).to(BF16)  # dtype probes: bf16
            if flags.get("t5_precision") == "fp8-weights":
                fp8_weights_only(model)
            elif flags.get("t5_precision") == "fp8-gemms":  # the scales are buffers of t5.safetensors:
                t5_to_fp8(model, placeholder_amax(model))  # the skeleton needs only which Linear is which kind
            return T5Graph(model)
        return ClipGraph(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig.from_dict(hf)).to(BF16))


def set_components(m: EngineManifest, load_t5: bool = True) -> list[str]:
    """The runtime components a set holds, in table order (T5 left out on request)."""
    return [c.name for c in RUNTIME if c.name in m.components and (c.name != "t5" or load_t5)]
