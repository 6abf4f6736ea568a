"""The torch reference backend: our MMDiT and VAE decoder, transformers' CLIP and T5 encoders."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..config import VariantConfig
from ..models.mmdit import MMDiT
from ..models.vae import VaeDecoder
from ..weights import load_module


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class _Clip:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds  # [B, 77, C], [B, C]


class _T5:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]  # [B, T, 4096]


class _Module:
    """Casts float inputs to the module's dtype, runs under `context` (e.g. an SDPA backend choice),
    returns float32."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, context=nullcontext) -> None:
        self.model, self.dtype, self.context = model, dtype, context

    @torch.inference_mode()
    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        cast = [a if a.dim() == 1 else a.to(self.dtype) for a in args]  # timestep stays fp32
        with self.context():
            return self.model(*cast).float()


def _text_model(ckpt: Checkpoint, name: str, device: torch.device, dtype: torch.dtype):
    """transformers' CLIPTextModelWithProjection / T5EncoderModel built from the checkpoint's
    (config, state dict): made on the meta device, then loaded strictly."""
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


class TorchBackend:
    """Loads an SD3.5 `Checkpoint` (diffusers folder or single file, or a path to one); T5 is
    optional (zeros are used when absent)."""

    name = "torch"

    def __init__(
        self,
        checkpoint: Checkpoint | str | Path,
        config: VariantConfig,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        load_t5: bool = True,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        ckpt = checkpoint
        if not isinstance(ckpt, Checkpoint):
            ckpt = Checkpoint.open(ckpt, family=config.family, t5=None if load_t5 else False)
        self.clip_l = _Clip(_text_model(ckpt, "clip_l", self.device, self.dtype))
        self.clip_g = _Clip(_text_model(ckpt, "clip_g", self.device, self.dtype))
        t5 = _text_model(ckpt, "t5", self.device, self.dtype) if load_t5 else None
        self.t5 = _T5(t5) if t5 is not None else None
        with torch.device("meta"):
            mmdit, vae = MMDiT(config.transformer), VaeDecoder(config.vae)
        mmdit = load_module(mmdit, ckpt.transformer_state(), ckpt.files["transformer"], self.device, self.dtype)
        vae = load_module(vae, ckpt.vae_decoder_state(), ckpt.files["vae"], self.device, self.dtype)
        self.transformer = _Module(mmdit, self.dtype)
        self.vae_decoder = _Module(vae, self.dtype)

    def close(self) -> None:
        for name in ("clip_l", "clip_g", "t5", "transformer", "vae_decoder"):
            setattr(self, name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
