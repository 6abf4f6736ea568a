"""Reading SD3 / SD3.5 LoRA files (safetensors only) into (A, B·scale) pairs by our module names.

Layouts read (keys; the mapping follows diffusers: its peft loader for the first, its kohya key
conversion `_convert_text_encoder_lora_key` / the SAI single-file names for the others):
  diffusers / peft   transformer.<diffusers name>.lora_A.weight / .lora_B.weight, text_encoder.…
                     (CLIP-L), text_encoder_2.… (CLIP-G); alpha from the `lora_adapter_metadata`
                     JSON (lora_alpha, r, alpha_pattern, rank_pattern, use_rslora), else alpha = rank
  kohya / sd-scripts lora_unet_<SAI name, '.'->'_'>.lora_down.weight / .lora_up.weight / .alpha,
                     lora_te1_… (CLIP-L), lora_te2_… (CLIP-G)
  SAI / ComfyUI      [model.]diffusion_model.<SAI name>.lora_{down,up|A,B}.weight [/.alpha],
                     text_encoders.clip_{l,g}.transformer.<name>.…
Scale of a layer: alpha / rank (peft's rslora: alpha / sqrt(rank)), folded into B. A fused SAI
`qkv` LoRA (one down, up [3D, r]) becomes three LoRAs on to_q/to_k/to_v sharing the down.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .files import sha256_file
from .weights import MMDIT_SAI_NAMES, rename_state

COMPONENTS = ("transformer", "clip_l", "clip_g")
_PEFT_PREFIX = {"transformer": "transformer", "text_encoder": "clip_l", "text_encoder_2": "clip_g"}
_KOHYA_PREFIX = {"lora_unet_": "transformer", "lora_te1_": "clip_l", "lora_te_": "clip_l", "lora_te2_": "clip_g"}
_SAI_PREFIX = {"model.diffusion_model.": "transformer", "diffusion_model.": "transformer",
               "text_encoders.clip_l.transformer.": "clip_l", "text_encoders.clip_g.transformer.": "clip_g"}
_SUFFIX = {".lora_A.weight": "down", ".lora_down.weight": "down", ".lora_B.weight": "up",
           ".lora_up.weight": "up", ".alpha": "alpha"}
# names whose own underscores survive kohya's '.' -> '_' (as diffusers' key conversion keeps them)
_COMPOUND = ("joint_blocks", "x_block", "context_block", "adaLN_modulation", "final_layer", "x_embedder",
             "t_embedder", "y_embedder", "context_embedder", "text_model", "self_attn", "q_proj", "k_proj",
             "v_proj", "out_proj", "text_projection", "final_layer_norm")
_SAI_ROOT = re.compile(r"^(joint_blocks|final_layer|x_embedder|t_embedder|y_embedder|context_embedder)\b")


@dataclass(frozen=True)
class LoraPart:
    down: torch.Tensor  # A [r, in], float32
    up: torch.Tensor  # B · scale [out, r], float32

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LoraFile:
    path: Path
    sha256: str
    parts: dict[str, dict[str, LoraPart]]  # component -> module name (diffusers/transformers) -> part

    @property
    def rank(self) -> int:
        return max((p.rank for mods in self.parts.values() for p in mods.values()), default=0)


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(component, module name as the file spells it, down|up|alpha), None for a key we do not read."""
    kind = next((k for s, k in _SUFFIX.items() if key.endswith(s)), None)
    if kind is None:
        return None
    stem = key[: -len(next(s for s in _SUFFIX if key.endswith(s)))]
    for table, dotted in ((_PEFT_PREFIX, True), (_SAI_PREFIX, True), (_KOHYA_PREFIX, False)):
        for prefix, comp in sorted(table.items(), key=lambda kv: -len(kv[0])):
            p = prefix if not dotted or prefix.endswith(".") else prefix + "."
            if stem.startswith(p):
                name = stem[len(p):]
                if not dotted:
                    name = name.replace("_", ".")
                    for c in _COMPOUND:
                        name = name.replace(c.replace("_", "."), c)
                return comp, name, kind
    if stem.startswith("transformer_blocks."):  # unprefixed diffusers names
        return "transformer", stem, kind
    return None


def _metadata_scale(meta: dict, comp_prefix: str, module: str, rank: int) -> float:
    """peft's scaling for `module`: alpha / r (alpha / sqrt(r) with use_rslora)."""
    cfg = {k.removeprefix(comp_prefix + "."): v for k, v in meta.items() if k.startswith(comp_prefix + ".")}
    if not cfg:
        return 1.0

    def pattern(patterns: dict, default):
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    r = pattern(cfg.get("rank_pattern"), cfg.get("r", rank))
    alpha = pattern(cfg.get("alpha_pattern"), cfg.get("lora_alpha", r))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def read_lora(path: str | Path, num_layers: int) -> LoraFile:
    """The LoRA at `path` by our module names (`num_layers`: the MMDiT's block count, for SAI names)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise CheckpointError(f"LoRA {path}: not a .safetensors file; only safetensors LoRAs are loaded "
                              f"(convert others with safetensors.torch.save_file)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"LoRA {path}: unreadable as safetensors ({exc})") from exc
    peft_meta = json.loads(meta.get("lora_adapter_metadata") or "{}")
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in tensors):
        raise CheckpointError(f"LoRA {path}: DoRA weights are not supported; use a plain LoRA")
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        hit = _split_key(key)
        if hit is None:
            if key.startswith(("lora_te3_", "text_encoders.t5xxl", "text_encoder_3")):
                raise CheckpointError(f"LoRA {path}: {key!r} targets T5, which SD3 LoRA loading (diffusers) "
                                      f"does not patch; drop the T5 part of the file")
            raise CheckpointError(f"LoRA {path}: key {key!r} is not an SD3 LoRA key (diffusers/peft "
                                  f"'transformer.…lora_A.weight' or kohya 'lora_unet_…lora_down.weight')")
        comp, name, kind = hit
        groups.setdefault((comp, name), {})[kind] = t
    parts: dict[str, dict[str, LoraPart]] = {c: {} for c in COMPONENTS}
    comp_prefix = {v: k for k, v in _PEFT_PREFIX.items()}
    for (comp, name), g in groups.items():
        if "down" not in g or "up" not in g:
            raise CheckpointError(f"LoRA {path}: layer {name!r} ({comp}) has no {'up' if 'down' in g else 'down'} "
                                  f"matrix; the file is incomplete")
        down, up = g["down"].float(), g["up"].float()
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise CheckpointError(f"LoRA {path}: layer {name!r}: down {tuple(down.shape)} and up {tuple(up.shape)} "
                                  f"are not a rank-r pair (conv LoRAs are not supported)")
        rank = down.shape[0]
        scale = float(g["alpha"]) / rank if "alpha" in g else _metadata_scale(peft_meta, comp_prefix[comp], name, rank)
        for target, up_part in _our_names(comp, name, up, path, num_layers).items():
            parts[comp][target] = LoraPart(down, up_part * scale)
    return LoraFile(path, sha256_file(path), {c: m for c, m in parts.items() if m})


def _our_names(comp: str, name: str, up: torch.Tensor, path: Path, num_layers: int) -> dict[str, torch.Tensor]:
    """{our module name: its rows of `up`}: SAI transformer names through the single-file table."""
    if comp != "transformer" or not _SAI_ROOT.match(name):
        return {name: up}
    out = rename_state({f"{name}.weight": up}, MMDIT_SAI_NAMES, "diffusers", path, last=num_layers - 1)
    return {k.removesuffix(".weight"): v for k, v in out.items()}
