"""T5-XXL with real FP8 GEMMs: static per-tensor activation scales calibrated over prompts, the
outlier-heavy Linears kept high precision.

T5's feed-forward output projection (`wo`, fed by gelu(wi_0 x) * wi_1 x) carries the activation
outliers T5-XXL is known for (transformers keeps it in fp32 for fp16 runs), so by default it stays
weight-only FP8 with bf16 compute (`FP8WeightLinear`); q/k/v/o and wi_0/wi_1, all fed by RMS-normed
inputs, become `FP8TextLinear` (the MMDiT's `FP8Linear` plus the `.weight` dtype probe that
transformers' T5 code reads).

The activation scales are calibrated where the MMDiT's are (`sd35trt export --precision fp8`, the
torch-fp8 engine-set build) and stored beside its `amax.safetensors` as `t5_amax.safetensors`
(the same format: one float32 amax per "<linear>.input_quantizer" / ".weight_quantizer", names
relative to transformers' T5EncoderModel). `load_t5_amax` is the one reader: no file -> None (T5
runs weight-only FP8, as before the file existed); a file that names other layers or was
calibrated on other weights -> `CheckpointError` when it is applied (`t5_to_fp8`).

`compile_text_encoders` compiles the CLIPs and T5 in place (inductor, no CUDA graphs: the
pipeline holds CLIP-L's output while CLIP-G runs, which graph replays would overwrite); the
encoders are launch-bound at 2 x 256 tokens, so compiling is what makes them faster than eager
bf16 (BENCHMARKS.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .fp8 import FP8Linear, FP8WeightLinear, replace_module

# Linear name suffixes kept high precision (weight-only FP8, bf16 compute) in T5.
T5_HIGH_PRECISION = ("DenseReluDense.wo",)
T5_AMAX = "t5_amax.safetensors"  # beside the MMDiT's amax.safetensors (export's calibration/, an engine set's)
TEXT_ENCODERS = ("clip_l", "clip_g", "t5")
WEIGHT_RTOL = 0.02  # a stored weight amax this far from the weights' own: calibrated on other weights


class FP8TextLinear(FP8Linear):
    """An FP8Linear that answers `.weight.dtype` (bf16) as transformers' T5 layers ask."""

    def __init__(self, linear: nn.Linear, in_amax: float, w_amax: float, fast_accum: bool = False) -> None:
        super().__init__(linear, in_amax, w_amax, fast_accum)
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=torch.bfloat16, device=self.weight_t.device),
                             persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self._dtype_probe


@torch.no_grad()
def calibrate_linears(model: nn.Module, batches: Iterable[torch.Tensor],
                      forward: Callable | None = None) -> dict[str, float]:
    """amax of every Linear's input (max over all `batches` of input ids) and weight, named as the
    MMDiT calibration ("<name>.input_quantizer", "<name>.weight_quantizer")."""
    amax: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            amax[f"{name}.weight_quantizer"] = float(mod.weight.abs().max())

            def hook(m, inp, _out, key=f"{name}.input_quantizer"):
                amax[key] = max(amax.get(key, 0.0), float(inp[0].abs().max()))

            hooks.append(mod.register_forward_hook(hook))
    try:
        for ids in batches:
            (forward or model)(ids)
    finally:
        for h in hooks:
            h.remove()
    return amax


def t5_to_fp8(model: nn.Module, amax: Mapping[str, float], keep: tuple[str, ...] = T5_HIGH_PRECISION,
              fast_accum: bool = True, source: str = "the T5 calibration") -> nn.Module:
    """In place: every Linear of T5 (transformers' T5EncoderModel) -> FP8TextLinear with its
    calibrated input scale, except names ending in `keep` -> FP8WeightLinear (weight-only FP8).
    The weight scale is the weight's own amax (on the meta device, a skeleton to load a saved
    state into: the stored one). `amax` must name exactly T5's Linears and match its weights
    (`check_t5_amax`, CheckpointError naming `source`). Returns the model."""
    check_t5_amax(model, amax, source)
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        if name.endswith(keep):
            replace_module(model, name, FP8WeightLinear(lin))
            continue
        w = lin.weight
        w_amax = amax[f"{name}.weight_quantizer"] if w.is_meta else float(w.detach().abs().max())
        replace_module(model, name, FP8TextLinear(lin, amax[f"{name}.input_quantizer"], w_amax, fast_accum))
    return model


def check_t5_amax(model: nn.Module, amax: Mapping[str, float], source: str = "the T5 calibration") -> None:
    """CheckpointError unless `amax` has an input and weight amax for every Linear of `model` and no
    other names, and each stored weight amax is within WEIGHT_RTOL of the weight's (skipped on meta)."""
    from ..errors import CheckpointError

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    wanted = {f"{n}.{k}" for n in linears for k in ("input_quantizer", "weight_quantizer")}
    fix = ("recalibrate it with this T5 (`sd35trt export --precision fp8` writes calibration/" + T5_AMAX +
           "), or delete it to run T5-XXL weight-only FP8")
    if set(amax) != wanted:
        odd = sorted(set(amax) ^ wanted)[:3]
        raise CheckpointError(f"{source} does not match this T5 (differs at {odd}): {fix}")
    for name, lin in linears.items():
        if lin.weight.is_meta:
            continue
        own, stored = float(lin.weight.detach().abs().max()), amax[f"{name}.weight_quantizer"]
        if abs(own - stored) > WEIGHT_RTOL * max(own, 1e-12):
            raise CheckpointError(f"{source} was calibrated on other T5 weights ({name}: weight amax {stored:.4g} "
                                  f"stored, {own:.4g} here): {fix}")


def placeholder_amax(model: nn.Module) -> dict[str, float]:
    """amax 1.0 for every Linear of `model`: for a meta skeleton whose scale buffers a saved state fills."""
    return {f"{n}.{k}": 1.0 for n, m in model.named_modules() if isinstance(m, nn.Linear)
            for k in ("input_quantizer", "weight_quantizer")}


def save_t5_amax(amax: Mapping[str, float], folder: str | Path, meta: Mapping[str, str] | None = None) -> Path:
    """`folder`/t5_amax.safetensors, atomically, in the MMDiT calibration's format (float32 [1] per name)."""
    import torch
    from safetensors.torch import save

    from ..files import atomic_write

    tensors = {k: torch.tensor([float(v)], dtype=torch.float32) for k, v in sorted(amax.items())}
    blob = save(tensors, metadata={"format": "pt", "component": "t5", **dict(meta or {})})
    return atomic_write(Path(folder) / T5_AMAX, lambda f: f.write(blob))


def t5_amax_file(calibration: str | Path) -> Path:
    """Where T5's calibration lives for a calibration folder (or its amax.safetensors file)."""
    path = Path(calibration)
    return (path if path.is_dir() else path.parent) / T5_AMAX


def load_t5_amax(calibration: str | Path) -> tuple[dict[str, float], dict[str, str]] | None:
    """(amax, metadata) of T5 beside a calibration (a folder or its amax.safetensors); None when it
    has none; CheckpointError when the file does not read as one."""
    from safetensors import safe_open

    from ..errors import CheckpointError

    file = t5_amax_file(calibration)
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            amax = {k: float(f.get_tensor(k).float().max()) for k in f.keys()}
    except Exception as exc:  # truncated / not safetensors
        raise CheckpointError(f"{file} is not a readable T5 calibration ({type(exc).__name__}: {exc}); delete it "
                              f"and recalibrate (`sd35trt export --precision fp8`)") from exc
    if meta.get("component") != "t5" or not amax:
        raise CheckpointError(f"{file} is not a T5 calibration (metadata {meta}); delete it and recalibrate")
    return amax, meta


def t5_precision(t5: nn.Module, amax: Mapping[str, float] | None, source: str = "the T5 calibration",
                 fast_accum: bool = True) -> str:
    """T5 (a T5Graph or T5EncoderModel) as the torch-fp8 backend runs it, in place: FP8 GEMMs with
    `amax`'s static scales ("fp8-gemms"), or weight-only FP8 without one ("fp8-weights")."""
    from .fp8 import fp8_weights_only

    model = getattr(t5, "model", t5)  # the T5EncoderModel inside a loader.T5Graph
    if amax is None:
        fp8_weights_only(model)
        return "fp8-weights"
    t5_to_fp8(model, amax, fast_accum=fast_accum, source=source)
    return "fp8-gemms"


def compile_text_encoders(modules: Mapping[str, nn.Module], names: Iterable[str] = TEXT_ENCODERS,
                          **compile_args) -> list[str]:
    """`module.compile(**compile_args)` in place for each of `names` in `modules` (the state dict and
    the module tree keep their names); returns the names compiled. No CUDA graphs by default: the
    caller passes torch.compile arguments (e.g. backend="aot_eager" in CPU tests)."""
    done = []
    for name in names:
        if name in modules:
            modules[name].compile(**compile_args)
            done.append(name)
    return done
