"""Loading weights: safetensors only (never pickle), sharded or not, straight into a module."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .errors import CheckpointError


def component_files(folder: Path) -> list[Path]:
    """The safetensors files of one diffusers component folder (shards listed by its index)."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files or not all(f.is_file() for f in files):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {pickles}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"no safetensors weights in {folder}{hint}")
    return files


def load_state_dict(folder: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors of a component folder whose name starts with `prefix` (prefix kept)."""
    state: dict[str, torch.Tensor] = {}
    for f in component_files(folder):
        state.update({k: v for k, v in load_file(f).items() if k.startswith(prefix)})
    return state


def load_module(
    module: nn.Module, state: dict[str, torch.Tensor], source: Path, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """Strictly load `state` into `module` and move it; names the file and keys on a mismatch."""
    own = set(module.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match {type(module).__name__} "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); is this an SD3.5 checkpoint "
            f"with the config.json beside it?"
        )
    for name, tensor in module.state_dict().items():
        if tensor.shape != state[name].shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, the config implies "
                f"{tuple(tensor.shape)}; config.json and weights disagree"
            )
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)
