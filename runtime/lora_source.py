"""The high-precision weight of one MMDiT layer, read from the checkpoint a backend loaded.

`fuse=True` on torch-fp8 (runtime/lora.py `fuse_lora`) re-quantizes W + s·BA from it, so each
weight is rounded to E4M3 once rather than twice. Only the asked-for tensors are read (safetensors,
one at a time). A fused q/k/v projection (`…to_qkv`, `…add_qkv`) is rebuilt as `fuse_qkv` builds
it: the three checkpoint tensors concatenated on dim 0. Anything else than the transformer of a
diffusers folder or a single file (CLIP layers stay nn.Linear; exported graphs hold no weights) → None.
"""

from __future__ import annotations

from typing import Callable

import torch

from .checkpoint import Checkpoint
from .models.fp8 import FUSED_QKV


def source_weight(ckpt: Checkpoint, component: str, layer: str, dtype: torch.dtype) -> torch.Tensor | None:
    """`layer`'s weight [out, in] as `ckpt` holds it, cast to `dtype` (what the loader cast it to
    before quantizing); None when it cannot be read."""
    return fused_source(lambda key: _read(ckpt, component, key), layer, dtype)


def fused_source(read: Callable[[str], torch.Tensor | None], layer: str, dtype: torch.dtype) -> torch.Tensor | None:
    """`layer`'s weight [out, in] from `read(diffusers tensor name)`; a fused q/k/v from its three parts."""
    parent, _, leaf = layer.rpartition(".")
    names = [f"{parent}.{p}" for p in FUSED_QKV[leaf]] if leaf in FUSED_QKV else [layer]
    parts = [read(f"{n}.weight") for n in names]
    if any(p is None for p in parts):
        return None
    return torch.cat([p.to(dtype) for p in parts], dim=0)  # [out, in]


def _read(ckpt: Checkpoint, component: str, key: str) -> torch.Tensor | None:
    return ckpt.transformer_tensor(key) if component == "transformer" else None  # each format: checkpoint.py
