"""Tiny SD3 ControlNets in diffusers layout, made from a tiny model's transformer, deterministically.

Two styles, as the released ControlNets are built:
  "large"    SD3.5 Large (Stability's canny / depth / blur): image-only blocks
             (`joint_attention_dim: null`), the transformer's patch embedding shared
             (`use_pos_embed: false`), the real pooled projections (`force_zeros_...: false`);
  "instantx" InstantX SD3: joint blocks over image + text, its own patch embedding and position
             table, zeros as pooled projections (`force_zeros_for_pooled_projection: true`).
Weights look trained: every tensor is non-zero, including the projections diffusers initialises
to zero (`controlnet_blocks`, `pos_embed_input`), so a test sees every part. Same arguments ->
byte-identical files.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from ..runtime.errors import InvalidInputError

STYLES = ("large", "instantx")
_TRANSFORMER_KEYS = ("sample_size", "patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
                     "pos_embed_max_size", "qk_norm")


def controlnet_config(transformer_cfg: dict, style: str, num_layers: int) -> dict:
    """SD3ControlNetModel kwargs for a ControlNet of `style` beside this transformer config."""
    if style not in STYLES:
        raise InvalidInputError(f"style={style!r} is unknown; choose one of {list(STYLES)}")
    cfg = {k: transformer_cfg[k] for k in _TRANSFORMER_KEYS if k in transformer_cfg}
    cfg.update(num_layers=num_layers, extra_conditioning_channels=0, dual_attention_layers=())
    if style == "large":
        cfg.update(joint_attention_dim=None, use_pos_embed=False, pos_embed_type=None, pos_embed_max_size=None,
                   qk_norm=None, force_zeros_for_pooled_projection=False)
    else:
        cfg.update(use_pos_embed=True, pos_embed_type="sincos", force_zeros_for_pooled_projection=True)
    return cfg


def _trained_looking(model: torch.nn.Module) -> None:
    """Give every all-zero tensor (diffusers' zero-initialised projections) a Linear-like init."""
    for name, p in model.named_parameters():
        if bool((p == 0).all()):
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                p.uniform_(-bound, bound)


def write_tiny_controlnet(model_dir: str | Path, out_dir: str | Path, style: str = "large", num_layers: int = 2,
                          seed: int = 0) -> Path:
    """Write a tiny SD3ControlNetModel folder for the tiny model at `model_dir` to `out_dir` atomically."""
    from diffusers import SD3ControlNetModel

    tcfg_file = Path(model_dir) / "transformer" / "config.json"
    if not tcfg_file.is_file():
        raise InvalidInputError(f"{tcfg_file} is missing; pass a tiny model folder (`sd35trt tiny-model OUT`)")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise InvalidInputError(f"num_layers={num_layers!r} must be an int >= 1")
    cfg = controlnet_config(json.loads(tcfg_file.read_text()), style, num_layers)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; remove it or pick another OUT_DIR")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = SD3ControlNetModel(**cfg)
        _trained_looking(model)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        model.save_pretrained(Path(tmp) / "cn", safe_serialization=True)
        if out_dir.exists():
            out_dir.rmdir()
        (Path(tmp) / "cn").rename(out_dir)
    return out_dir
