"""The one loader of torch modules from a `Checkpoint`, shared by the torch backends, the ONNX
export and the FP8 calibration.

Every module it returns has its component's signature from the component table (inputs in table
order, outputs a tensor or a tuple in table order), so a backend can call it and the exporter can
trace it as it is.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..weights import load_module
from .mmdit import MMDiT
from .vae import VaeDecoder, VaeEncoder


class TextGraph(nn.Module):
    """A transformers text encoder (`model`) with its component's signature."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def inner_model(module: nn.Module) -> nn.Module:
    """The model a component module runs: the transformers model inside a text graph, else itself."""
    return module.model if isinstance(module, TextGraph) else module


class ClipGraph(TextGraph):
    """input_ids [B, 77] -> (penultimate hidden states [B, 77, C], pooled projection [B, C])."""

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class T5Graph(TextGraph):
    """input_ids [B, T] -> hidden states [B, T, 4096]."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]


def text_model(ckpt: Checkpoint, name: str, device: torch.device, dtype: torch.dtype) -> nn.Module | None:
    """transformers' CLIPTextModelWithProjection / T5EncoderModel built from the checkpoint's
    (config, state dict): made on the meta device, then loaded strictly. None when absent."""
    import transformers

    found = ckpt.text_encoder(name, dtype)
    if found is None:
        return None
    cfg, state = found
    cls = transformers.T5EncoderModel if name == "t5" else transformers.CLIPTextModelWithProjection
    with torch.device("meta"):
        model = cls(cfg)
    for module in model.modules():  # non-persistent buffers are not in any file: rebuild them
        for key, buf in module.named_buffers(recurse=False):
            if buf.is_meta and key == "position_ids":
                module.register_buffer(key, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    model = load_module(model, state, ckpt.files[name], device, dtype)
    if name == "t5":
        model.set_input_embeddings(model.get_input_embeddings())  # re-tie shared / embed_tokens
    return model


def _text(name: str):
    def load(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> nn.Module | None:
        model = text_model(ckpt, name, device, dtype)
        return None if model is None else (T5Graph if name == "t5" else ClipGraph)(model)

    return load


def _built(cls: type, spec: str, state: str, source: str):
    def load(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> nn.Module:
        with torch.device("meta"):
            module = cls(getattr(ckpt.config, spec))
        return load_module(module, getattr(ckpt, state)(), ckpt.files[source], device, dtype)

    return load


# component -> how its module is made (names as in the component table).
LOADERS = {
    "clip_l": _text("clip_l"),
    "clip_g": _text("clip_g"),
    "t5": _text("t5"),
    "transformer": _built(MMDiT, "transformer", "transformer_state", "transformer"),
    "vae_decoder": _built(VaeDecoder, "vae", "vae_decoder_state", "vae"),
    "vae_encoder": _built(VaeEncoder, "vae", "vae_encoder_state", "vae"),
}


def load_modules(ckpt: Checkpoint, components: Iterable[str], device: torch.device,
                 dtype: torch.dtype) -> dict[str, nn.Module]:
    """The modules of `components` in eval mode on `device`; optional ones the checkpoint lacks
    (T5 left out) are absent from the result."""
    mods = {name: LOADERS[name](ckpt, device, dtype) for name in components}
    return {name: m for name, m in mods.items() if m is not None}
