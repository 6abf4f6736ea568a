"""Stability AI's single-file SD3.5 Large ControlNets (`sd3.5_large_controlnet_canny.safetensors`,
blur, depth: the sd3.5 repo's ControlNetEmbedder names) as our SD3ControlNet.

No config travels with such a file: the architecture is read from the tensor shapes (blocks,
width, pooled width, conditioning channels and patch) and from the MMDiT it serves (head size:
the residuals are added to its stream, so the widths must agree). It is an SD3.5 Large style net:
image-only blocks, the transformer's patch embedding (its own `x_embedder` is unused by the 8B
model and dropped), the real pooled projections. `control_type` (0 blur, 1 canny, 2 depth) is
returned for the caller (the canny net expects its own VAE input, runtime/preprocess.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..config import TransformerSpec
from ..errors import CheckpointError
from ..weights import load_module, read_header, rename_state
from .controlnet import ControlNetSpec, SD3ControlNet, load_controlnet

_T = "transformer_blocks.{i}."
CONTROLNET_SAI_NAMES: tuple[tuple[str, str, str], ...] = (
    ("t_embedder.mlp.0.{p}", "time_text_embed.timestep_embedder.linear_1.{p}", ""),
    ("t_embedder.mlp.2.{p}", "time_text_embed.timestep_embedder.linear_2.{p}", ""),
    ("y_embedder.mlp.0.{p}", "time_text_embed.text_embedder.linear_1.{p}", ""),
    ("y_embedder.mlp.2.{p}", "time_text_embed.text_embedder.linear_2.{p}", ""),
    ("pos_embed_input.proj.{p}", "pos_embed_input.proj.{p}", ""),
    ("controlnet_blocks.{i}.{p}", "controlnet_blocks.{i}.{p}", ""),
    (_T + "adaLN_modulation.1.{p}", _T + "norm1.linear.{p}", ""),
    (_T + "attn.qkv.{p}", _T + "attn.to_{x}.{p}", "qkv"),
    (_T + "attn.proj.{p}", _T + "attn.to_out.0.{p}", ""),
    (_T + "mlp.fc1.{p}", _T + "ff.net.0.proj.{p}", ""),
    (_T + "mlp.fc2.{p}", _T + "ff.net.2.{p}", ""),
)
CONTROL_TYPES = {0: "blur", 1: "canny", 2: "depth"}
_UNUSED = ("x_embedder.", "control_type")


def _need(shapes: dict, key: str, file: Path) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{file}: tensor {key!r} is missing; not a Stability SD3.5 ControlNet file "
                              f"(pass a diffusers ControlNet folder instead)")
    return shapes[key]


def single_file_spec(file: Path, transformer: TransformerSpec) -> ControlNetSpec:
    shapes, _ = read_header(file)
    d, d_in = _need(shapes, "controlnet_blocks.0.weight", file)
    d_cond, channels, p, _ = _need(shapes, "pos_embed_input.proj.weight", file)
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks.")}
    if not blocks or blocks != set(range(len(blocks))):
        raise CheckpointError(f"{file}: transformer_blocks are missing or not numbered 0..n-1")
    if d != transformer.inner_dim or d_in != d or d_cond != d:
        raise CheckpointError(f"{file}: ControlNet width {d} does not fit the model's transformer "
                              f"({transformer.inner_dim}); use a ControlNet trained for this SD3.5 variant")
    return ControlNetSpec(
        sample_size=transformer.sample_size, patch_size=p, in_channels=channels, num_layers=len(blocks),
        attention_head_dim=transformer.attention_head_dim, num_attention_heads=transformer.num_attention_heads,
        joint_attention_dim=None, caption_projection_dim=transformer.caption_projection_dim,
        pooled_projection_dim=_need(shapes, "y_embedder.mlp.0.weight", file)[1], out_channels=channels,
        pos_embed_max_size=None, extra_conditioning_channels=0, qk_norm=None, pos_embed_type=None,
        use_pos_embed=False, force_zeros_for_pooled_projection=False)


def load_single_file(file: Path, transformer: TransformerSpec, pos_embed_state: Callable[[], dict],
                     device: torch.device, dtype: torch.dtype) -> tuple[SD3ControlNet, str | None]:
    """(our SD3ControlNet, its control type name or None) from a Stability single file."""
    from safetensors import safe_open

    spec = single_file_spec(file, transformer)
    with safe_open(str(file), framework="pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    kind = raw.get("control_type")
    state = rename_state({k: v for k, v in raw.items() if not k.startswith(_UNUSED)}, CONTROLNET_SAI_NAMES,
                         "diffusers", file)
    state.update(pos_embed_state())
    with torch.device("meta"):
        module = SD3ControlNet(spec, transformer)
    net = load_module(module, state, file, device, dtype)
    return net, None if kind is None else CONTROL_TYPES.get(int(kind.flatten()[0]))


def load_any(path: str | Path, transformer: TransformerSpec, pos_embed_state: Callable[[], dict],
             device: torch.device, dtype: torch.dtype) -> SD3ControlNet:
    """A diffusers ControlNet folder or Stability's `.safetensors` file, as our SD3ControlNet."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return load_single_file(path, transformer, pos_embed_state, device, dtype)[0]
    return load_controlnet(path, transformer, pos_embed_state, device, dtype)
