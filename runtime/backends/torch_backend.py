"""The torch reference backend: our MMDiT and VAE, transformers' CLIP and T5 encoders.

The MMDiT's attention core is chosen once at load (`models.flash_attention.choose_attention`):
FlashAttention-4 on sm90/sm100 in bf16/fp16 where it is installed, cuDNN SDPA on other GPUs, SDPA
on the CPU; `backend.attention` says which and why.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..components import RUNTIME
from ..config import VariantConfig
from ..models.flash_attention import AttentionChoice, choose_attention, set_attention_core
from ..models.controlnet import ControlNetSpec
from ..models.controlnet_file import load_any
from ..models.loader import inner_model, load_modules
from .base import BackendBase, ComponentCall

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """`dtype` as a torch dtype: a torch.dtype, one of fp32|bf16|fp16, or None (the device's default)."""
    from ..errors import InvalidInputError

    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidInputError(f"dtype={dtype!r}: use one of {list(DTYPES)} (or the torch dtype)")


class ModuleRun:
    """Casts float inputs to the module's dtype, runs under `context` (e.g. an SDPA backend choice),
    returns the outputs as a tuple."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, context=nullcontext) -> None:
        self.model, self.dtype, self.context = model, dtype, context

    @torch.inference_mode()
    def __call__(self, *args: torch.Tensor, **options: object) -> tuple[torch.Tensor, ...]:
        cast = [a if not a.is_floating_point() or a.dim() == 1 else a.to(self.dtype) for a in args]  # timestep stays fp32
        with self.context():
            out = self.model(*cast, **options)
        return out if isinstance(out, tuple) else (out,)


class TorchBackend(BackendBase):
    """Loads an SD3.5 `Checkpoint` (diffusers folder or single file, or a path to one); T5 is
    optional (zeros are used when absent). `modules` holds the loaded torch modules by component."""

    name = "torch"
    skip_layers = True  # our MMDiT skips blocks on request (skip-layer guidance)
    controlnet = True  # our MMDiT takes controlnet_residuals= (runtime/control.py)
    stages_weights = True  # takes load_device= and has weight_handles(): memory modes (runtime/memory.py)

    def __init__(
        self,
        checkpoint: Checkpoint | str | Path,
        config: VariantConfig,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        load_t5: bool = True,
        load_device: str | torch.device | None = None,
    ) -> None:
        """`load_device`: where the weights are made (default `device`); memory modes load them on
        the CPU and move each component to `device` when its stage runs."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device)
        ckpt = checkpoint
        if not isinstance(ckpt, Checkpoint):
            ckpt = Checkpoint.open(ckpt, family=config.family, t5=None if load_t5 else False)
        names = [c.name for c in RUNTIME if c.name != "t5" or load_t5]
        self.modules: dict[str, nn.Module] = load_modules(ckpt, names, torch.device(load_device or self.device),
                                                          self.dtype)
        self._checkpoint: Checkpoint | None = ckpt  # fuse=True reads a layer's source weight from it
        self._choose_attention()

    @classmethod
    def from_modules(cls, modules: Mapping[str, nn.Module], device: torch.device, dtype: torch.dtype) -> TorchBackend:
        """A backend over modules already loaded (`models.loader.load_modules`), e.g. for calibration."""
        self = cls.__new__(cls)
        self.device, self.dtype, self.modules = torch.device(device), dtype, dict(modules)
        self._choose_attention()
        return self

    def _choose_attention(self) -> None:
        self.attention: AttentionChoice = choose_attention(self.device, self.dtype)
        if "transformer" in self.modules:
            set_attention_core(self.modules["transformer"], self.attention.core)
        self.bind()

    def bind(self) -> None:
        """(Re)make the component callables from `modules` (the transformer under the attention's context)."""
        for c in RUNTIME:
            module = self.modules.get(c.name)
            ctx = self.attention.context if c.name == "transformer" else nullcontext
            call = None if module is None else ComponentCall(ModuleRun(module, self.dtype, ctx), c.name, inner_model(module))
            setattr(self, c.name, call)

    def load_controlnet(self, folder: Path) -> tuple[ControlNetSpec, Callable[..., torch.Tensor]]:
        """Our SD3ControlNet from a diffusers folder or Stability file, on this backend's device,
        dtype and attention; one that shares the MMDiT's patch embedding gets the loaded transformer's."""
        net = self._controlnet_module(folder)
        set_attention_core(net, self.attention.core)
        run = ModuleRun(net, self.dtype, self.attention.context)
        return net.spec, lambda *args: run(*args)[0]

    def _controlnet_module(self, folder: Path) -> nn.Module:
        mmdit = self.modules["transformer"]
        mmdit = getattr(mmdit, "_orig_mod", mmdit)  # under torch.compile

        def pos_embed() -> dict[str, torch.Tensor]:
            return {f"pos_embed.{k}": v for k, v in mmdit.pos_embed.state_dict().items()}

        return load_any(folder, mmdit.spec, pos_embed, self.device, self.dtype)

    def source_weight(self, component: str, layer: str) -> torch.Tensor | None:
        """`layer`'s weight [out, in] of `component` as the checkpoint holds it (read now, that tensor
        alone), in this backend's dtype; None when unreadable (fuse=True then re-quantizes FP8 weights)."""
        from ..lora_source import source_weight

        ckpt = getattr(self, "_checkpoint", None)  # None: built from_modules
        return None if ckpt is None else source_weight(ckpt, component, layer, self.dtype)

    def weight_handles(self) -> dict:
        """component -> its module's weights, moved to the host now (memory modes move them back per
        stage); T5-XXL's can also stream block by block (memory='low', models/streaming.py)."""
        from ..models.offload import ModuleWeights
        from ..models.streaming import BlockStream, t5_pieces

        pieces = t5_pieces(self.modules["t5"]) if "t5" in self.modules else None
        return {name: BlockStream(m, pieces, self.device) if name == "t5" and pieces
                else ModuleWeights(m, self.device) for name, m in self.modules.items()}

    def close(self) -> None:
        self.modules = {}
        for c in RUNTIME:
            setattr(self, c.name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
