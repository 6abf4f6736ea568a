"""FP8 (E4M3) calibration of the MMDiT with nvidia-modelopt over real denoising trajectories.

Per-tensor max calibration of the weights and input activations of every Linear in the MMDiT
except an exclusion list (embedders, context_embedder, time_text_embed, pos_embed, norm_out,
proj_out by default). The activations are collected while *our own* runtime loop denoises N
calibration prompts for all steps with CFG exactly as at inference, with seeded noise, so the
same inputs give the same scales. The result (`CalibState`) is saved as safetensors + JSON and
re-applied to a fresh model without recalibrating (ONNX export, torch FP8 path).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from ..runtime.backends.base import ComponentCall
from ..runtime.backends.torch_backend import ModuleRun
from ..runtime.errors import CheckpointError, InvalidInputError
from ..runtime.files import atomic_write
from ..runtime.config import VariantConfig
from ..runtime.models.fp8 import HIGH_PRECISION
from ..runtime.models.fp8_text import calibrate_linears
from ..runtime.pipeline import sample
from ..runtime.requests import normalize_request
from ..runtime.text import PromptEncoder

DEFAULT_EXCLUDE = HIGH_PRECISION
CALIB_DIR = Path(__file__).resolve().parent.parent / "calib_prompts"


@dataclass(frozen=True)
class CalibSettings:
    num_prompts: int = 8
    steps: int | None = None  # None: the variant's default
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE


@dataclass
class CalibState:
    """amax per enabled quantizer ("<module>.input_quantizer" / ".weight_quantizer")."""

    amax: dict[str, float]
    settings: CalibSettings
    meta: dict[str, str] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: torch.tensor([v], dtype=torch.float32) for k, v in sorted(self.amax.items())}
        doc = {"settings": asdict(self.settings), "meta": self.meta, "amax": dict(sorted(self.amax.items()))}
        blob = save(tensors, metadata={"format": "pt"})
        atomic_write(folder / "amax.safetensors", lambda f: f.write(blob))
        atomic_write(folder / "amax.json", lambda f: f.write((json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()))

    @classmethod
    def load(cls, folder: Path) -> CalibState:
        path = folder / "amax.safetensors"
        if not path.is_file() or not (folder / "amax.json").is_file():
            raise CheckpointError(f"no calibration in {folder}; run `sd35trt export` with --precision fp8")
        doc = json.loads((folder / "amax.json").read_text())
        settings = doc["settings"]
        settings["exclude"] = tuple(settings["exclude"])
        amax = {k: float(v.item()) for k, v in load_file(str(path)).items()}
        return cls(amax=amax, settings=CalibSettings(**settings), meta=doc.get("meta", {}))


def quant_config(exclude: Sequence[str]) -> dict:
    """ModelOpt config: FP8 E4M3 per-tensor weights and inputs of Linear layers, max calibration."""
    fp8 = {"num_bits": (4, 3), "axis": None}
    rules = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Linear", "cfg": fp8},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Linear", "cfg": fp8},
    ]
    rules += [{"quantizer_name": f"{pat}*", "enable": False} for pat in exclude]
    return {"quant_cfg": rules, "algorithm": "max"}


def read_prompts(n: int, folder: Path = CALIB_DIR) -> tuple[list[str], list[str]]:
    """The first `n` calibration prompts (file order is the contract) and the negative list."""
    prompts = [p for p in (folder / "prompts.txt").read_text(encoding="utf-8").splitlines() if p.strip()]
    negatives = [p for p in (folder / "negative.txt").read_text(encoding="utf-8").splitlines() if p.strip()]
    if not 1 <= n <= len(prompts):
        raise InvalidInputError(f"calib size {n} must be in [1, {len(prompts)}] (prompts in {folder})")
    return prompts[:n], negatives


def quantize_module(model: nn.Module, exclude: Sequence[str], forward_loop=None) -> nn.Module:
    import modelopt.torch.quantization as mtq

    return mtq.quantize(model, quant_config(exclude), forward_loop=forward_loop)


def collect_amax(model: nn.Module) -> dict[str, float]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, TensorQuantizer) and mod.is_enabled and mod.amax is not None:
            out[name] = float(mod.amax.float().max())
    return out


def apply_calibration(model: nn.Module, state: CalibState) -> nn.Module:
    """Insert the quantizers into a fresh MMDiT and load the saved amax values (no recalibration)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    model = quantize_module(model, state.settings.exclude, forward_loop=None)
    enabled = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}
    if set(enabled) != set(state.amax):
        missing = sorted(set(enabled) ^ set(state.amax))[:5]
        raise CheckpointError(f"calibration does not match this model (differs at {missing}); recalibrate")
    for name, q in enabled.items():
        q.amax = torch.tensor(state.amax[name], dtype=torch.float32)
    return model


def calibrate(encode: PromptEncoder, model: nn.Module, settings: CalibSettings,
              progress: bool = True) -> tuple[CalibState, nn.Module]:
    """Denoise the calibration prompts with the runtime's own prompt encoding and loop
    (`pipeline.sample`), collecting max |x| per quantizer of `model` (the MMDiT, which ModelOpt
    quantizes in place). Returns the calibration and the quantized model."""
    prompts, negatives = read_prompts(settings.num_prompts)
    config, device = encode.config, encode.backend.device
    dtype = next(model.parameters()).dtype

    def loop(quantized: nn.Module) -> None:
        transformer = ComponentCall(ModuleRun(quantized, dtype), "transformer")
        for i, prompt in enumerate(tqdm(prompts, desc="calibrate", disable=not progress)):
            req = normalize_request(config, prompt, negative_prompt=negatives[i % len(negatives)],
                                    height=settings.height, width=settings.width,
                                    num_inference_steps=settings.steps, guidance_scale=settings.guidance)
            sample(encode, transformer, device, req, generator=torch.Generator().manual_seed(settings.seed + i))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = quantize_module(model, settings.exclude, loop)
    digest = hashlib.sha256("\n".join(prompts + negatives).encode()).hexdigest()[:16]
    return CalibState(collect_amax(model), settings, {"prompts_sha256": digest}), model


def prompts_digest(prompts: Sequence[str], negatives: Sequence[str]) -> str:
    return hashlib.sha256("\n".join([*prompts, *negatives]).encode()).hexdigest()[:16]


def t5_calibration_ids(tokenizer, config: VariantConfig, num_prompts: int,
                       device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], dict[str, str]]:
    """The T5 token ids [2, T] of the first `num_prompts` calibration pairs [negative; prompt], as the
    pipeline encodes a CFG pair (T = the variant's max_sequence_length), and their description."""
    prompts, negatives = read_prompts(num_prompts)
    n = config.max_sequence_length
    ids = [tokenizer([negatives[i % len(negatives)], p], n).to(device) for i, p in enumerate(prompts)]
    meta = {"prompts_sha256": prompts_digest(prompts, negatives), "num_prompts": str(num_prompts),
            "max_sequence_length": str(n)}
    return ids, meta


def calibrate_t5(t5: nn.Module, tokenizer, config: VariantConfig, num_prompts: int,
                 device: torch.device | str = "cpu") -> tuple[dict[str, float], dict[str, str]]:
    """(amax, metadata) of T5's Linears (transformers' T5EncoderModel names; a loader.T5Graph or the
    model itself) over the calibration pairs: max |x| of every input, |W| of every weight, the
    statistic the MMDiT's calibration takes (runtime/models/fp8_text.py stores and applies it)."""
    model = getattr(t5, "model", t5)
    batches, meta = t5_calibration_ids(tokenizer, config, num_prompts, device)
    return calibrate_linears(model, batches, lambda ids: model(ids)), meta
