"""The torch reference backend: our MMDiT and VAE decoder, transformers' CLIP and T5 encoders."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import VariantConfig
from ..errors import CheckpointError
from ..models.mmdit import MMDiT
from ..models.vae import VaeDecoder
from ..weights import load_module, load_state_dict


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
    """Casts float inputs to the module's dtype, returns float32."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype

    @torch.inference_mode()
    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        cast = [a if a.dim() == 1 else a.to(self.dtype) for a in args]  # timestep stays fp32
        return self.model(*cast).float()


def _text_model(cls_name: str, folder: Path, device: torch.device, dtype: torch.dtype):
    import transformers

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}/config.json is missing; the text encoder folder is incomplete")
    model = getattr(transformers, cls_name).from_pretrained(folder, use_safetensors=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


class TorchBackend:
    """Loads a diffusers-layout SD3.5 folder; T5 is optional (zeros are used when absent)."""

    name = "torch"

    def __init__(
        self,
        path: Path,
        config: VariantConfig,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        load_t5: bool = True,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        path = Path(path)
        clip = "CLIPTextModelWithProjection"
        self.clip_l = _Clip(_text_model(clip, path / "text_encoder", self.device, self.dtype))
        self.clip_g = _Clip(_text_model(clip, path / "text_encoder_2", self.device, self.dtype))
        t5_dir = path / "text_encoder_3"
        self.t5 = None
        if load_t5 and t5_dir.is_dir():
            self.t5 = _T5(_text_model("T5EncoderModel", t5_dir, self.device, self.dtype))
        with torch.device("meta"):
            mmdit, vae = MMDiT(config.transformer), VaeDecoder(config.vae)
        src = path / "transformer"
        mmdit = load_module(mmdit, load_state_dict(src), src, self.device, self.dtype)
        src = path / "vae"
        vae = load_module(vae, load_state_dict(src, "decoder."), src, self.device, self.dtype)
        self.transformer = _Module(mmdit, self.dtype)
        self.vae_decoder = _Module(vae, self.dtype)

    def close(self) -> None:
        for name in ("clip_l", "clip_g", "t5", "transformer", "vae_decoder"):
            setattr(self, name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
