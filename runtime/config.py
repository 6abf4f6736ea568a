"""One frozen config per model variant: every shape, default and engine profile derives from it.

Export, build and the runtime all read a `VariantConfig`. The architecture always comes from a
checkpoint's own config files (`VariantConfig.from_checkpoint`), never from a file name; the
three released SD3.5 models are also available as presets (`VARIANTS`) for real-shape work with
random weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import CheckpointError, InvalidInputError

# Written into model_index.json by sd35trt so that Large and Large Turbo (identical architectures)
# can be told apart; diffusers ignores keys that start with "_".
VARIANT_HINT_KEY = "_sd35trt_family"


@dataclass(frozen=True)
class TransformerSpec:
    """MMDiT architecture, field names as in diffusers' SD3Transformer2DModel config."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    caption_projection_dim: int
    pos_embed_max_size: int
    sample_size: int = 128  # default latent side: 128 latents -> 1024 px
    joint_attention_dim: int = 4096  # T5 width
    pooled_projection_dim: int = 2048  # pooled CLIP-L (768) + CLIP-G (1280)
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    qk_norm: str | None = "rms_norm"
    dual_attention_layers: tuple[int, ...] = ()

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> TransformerSpec:
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        kwargs["dual_attention_layers"] = tuple(cfg.get("dual_attention_layers") or ())
        return cls(**kwargs)

    def to_config(self) -> dict[str, Any]:
        cfg = asdict(self)
        cfg["dual_attention_layers"] = list(self.dual_attention_layers)
        return {"_class_name": "SD3Transformer2DModel", **cfg}


@dataclass(frozen=True)
class VaeSpec:
    """SD3 VAE (16 latent channels), field names as in diffusers' AutoencoderKL config."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    latent_channels: int = 16
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> VaeSpec:
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        kwargs["block_out_channels"] = tuple(cfg["block_out_channels"])
        return cls(**kwargs)


@dataclass(frozen=True)
class Sampling:
    """Default sampling settings of a variant (what the released model cards use)."""

    steps: int
    guidance: float
    shift: float = 3.0


FAMILY_SAMPLING = {
    "large": Sampling(steps=28, guidance=3.5),
    "medium": Sampling(steps=40, guidance=4.5),
    "large-turbo": Sampling(steps=4, guidance=0.0),
}


@dataclass(frozen=True)
class VariantConfig:
    """Everything shape-related about one model variant, derived once."""

    name: str
    family: str  # "large" | "medium" | "large-turbo"
    transformer: TransformerSpec
    vae: VaeSpec = field(default_factory=VaeSpec)
    clip_l_dim: int = 768
    clip_g_dim: int = 1280
    clip_tokens: int = 77
    max_sequence_length: int = 256  # T5 tokens
    sampling: Sampling | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILY_SAMPLING:
            raise CheckpointError(
                f"unknown SD3.5 family {self.family!r}; expected one of {sorted(FAMILY_SAMPLING)}"
            )
        if self.sampling is None:
            object.__setattr__(self, "sampling", FAMILY_SAMPLING[self.family])

    # --- derived shapes -------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor x patch size = 16)."""
        return self.vae.scale_factor * self.transformer.patch_size

    @property
    def default_size(self) -> int:
        return self.transformer.sample_size * self.vae.scale_factor

    @property
    def max_size(self) -> int:
        """Largest side the positional-embedding table covers."""
        return self.transformer.pos_embed_max_size * self.size_multiple

    @property
    def min_size(self) -> int:
        return self.size_multiple

    @property
    def joint_dim(self) -> int:
        return self.transformer.joint_attention_dim

    @property
    def pooled_dim(self) -> int:
        return self.transformer.pooled_projection_dim

    def text_tokens(self, max_sequence_length: int | None = None) -> int:
        """Length of the joint text sequence: 77 CLIP tokens + T5 tokens."""
        return self.clip_tokens + (max_sequence_length or self.max_sequence_length)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae.scale_factor
        return (batch, self.vae.latent_channels, height // f, width // f)  # [B, 16, H/8, W/8]

    def image_tokens(self, height: int, width: int) -> int:
        return (height // self.size_multiple) * (width // self.size_multiple)

    def check_size(self, height: int, width: int, min_size: int | None = None, max_size: int | None = None) -> None:
        """Both sides are ints, multiples of `size_multiple` and in the model's range, narrowed by
        `min_size`/`max_size` where a caller (a server's limits, an engine profile) allows less."""
        lo, hi = max(self.min_size, min_size or 0), min(self.max_size, max_size or self.max_size)
        for label, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise InvalidInputError(f"{label}={v!r} must be an int (pixels)")
            if v % self.size_multiple:
                down = v - v % self.size_multiple
                raise InvalidInputError(
                    f"{label}={v} is not a multiple of {self.size_multiple}; use {down or self.size_multiple} or "
                    f"{down + self.size_multiple}"
                )
            if (lo, hi) != (self.min_size, self.max_size) and not lo <= v <= hi:
                raise InvalidInputError(f"{label}={v} is outside [{lo}, {hi}]; pick a size in range")
            if not self.min_size <= v <= self.max_size:
                raise InvalidInputError(
                    f"{label}={v} is outside {self.name}'s range [{self.min_size}, "
                    f"{self.max_size}] (positional embedding covers "
                    f"{self.transformer.pos_embed_max_size} patches); pick a size in range"
                )

    # --- engine profiles ------------------------------------------------------------------
    def io_shapes(self, batch: int, height: int, width: int,
                  max_sequence_length: int | None = None) -> dict[str, dict[str, tuple[int, ...]]]:
        """Concrete input shapes of every runtime component for one request (batch = model batch)."""
        from .components import request_shapes

        return request_shapes(self, batch, height, width, max_sequence_length)

    def engine_profiles(
        self,
        sizes: tuple[int, int, int] = (512, 1024, 1536),
        batches: tuple[int, int, int] = (1, 1, 4),
        cfg: bool = True,
        residuals: int | None = None,
    ) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
        """(min, opt, max) shapes per component input (the component table says which inputs and
        which components CFG doubles: all but the VAE); `residuals`: an export's ControlNet block
        count (its residual transformer and the ControlNet, `components.engine_profiles`)."""
        from .components import engine_profiles

        return engine_profiles(self, sizes, batches, cfg, residuals)

    # --- construction ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (manifests of exported ONNX and engine sets)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VariantConfig:
        t = dict(d["transformer"], dual_attention_layers=tuple(d["transformer"]["dual_attention_layers"]))
        v = dict(d["vae"], block_out_channels=tuple(d["vae"]["block_out_channels"]))
        rest = {k: d[k] for k in ("name", "family", "clip_l_dim", "clip_g_dim", "clip_tokens", "max_sequence_length")}
        return cls(transformer=TransformerSpec(**t), vae=VaeSpec(**v), sampling=Sampling(**d["sampling"]), **rest)

    def with_family(self, family: str) -> VariantConfig:
        return replace(self, family=family, sampling=FAMILY_SAMPLING[family])

    @classmethod
    def from_checkpoint(cls, folder: str | Path, family: str | None = None) -> VariantConfig:
        """Read a diffusers-layout folder's configs; `family` overrides the detected family."""
        folder = Path(folder)
        tcfg = _read_json(folder / "transformer" / "config.json")
        vcfg = _read_json(folder / "vae" / "config.json")
        index = _read_json(folder / "model_index.json")
        spec = TransformerSpec.from_config(tcfg)
        detected = "medium" if spec.dual_attention_layers else "large"
        family = family or index.get(VARIANT_HINT_KEY) or detected
        shift = _read_json(folder / "scheduler" / "scheduler_config.json").get("shift", 3.0)
        sampling = replace(FAMILY_SAMPLING[family], shift=float(shift))
        name = next((n for n, v in VARIANTS.items() if v.transformer == spec), None)
        name = name if name and VARIANTS[name].family == family else f"custom-{family}"
        l_dim = _read_json(folder / "text_encoder" / "config.json").get("hidden_size", 768)
        g_dim = _read_json(folder / "text_encoder_2" / "config.json").get("hidden_size", 1280)
        return cls(
            name=name,
            family=family,
            transformer=spec,
            vae=VaeSpec.from_config(vcfg),
            clip_l_dim=l_dim,
            clip_g_dim=g_dim,
            sampling=sampling,
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; a model folder needs the diffusers SD3 layout (transformer/, vae/, "
            f"text_encoder*/, tokenizer*/, scheduler/, model_index.json)"
        )
    return json.loads(path.read_text())


_LARGE = TransformerSpec(
    num_layers=38, num_attention_heads=38, attention_head_dim=64,
    caption_projection_dim=2432, pos_embed_max_size=192,
)
_MEDIUM = TransformerSpec(
    num_layers=24, num_attention_heads=24, attention_head_dim=64,
    caption_projection_dim=1536, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
)

VARIANTS: dict[str, VariantConfig] = {
    "sd3.5-large": VariantConfig("sd3.5-large", "large", _LARGE),
    "sd3.5-large-turbo": VariantConfig("sd3.5-large-turbo", "large-turbo", _LARGE),
    "sd3.5-medium": VariantConfig("sd3.5-medium", "medium", _MEDIUM),
}

