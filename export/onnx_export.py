"""torch -> ONNX for one component: trace, standard FP8 Q/DQ, fold, save (external data), infer shapes.

Graphs use opset 19 (float8 QuantizeLinear/DequantizeLinear), dynamic batch, latent height and
width, and T5 length; input/output names come from `COMPONENT_IO`. The TorchScript exporter is
used because ModelOpt's quantizers export through it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from ..runtime.config import COMPONENT_IO, VariantConfig
from .qdq import fold, qdq_summary, quantize_weights, to_standard_qdq

OPSET = 19
EXTERNAL_DATA_BYTES = 1 << 30  # weights beyond 1 GiB go to <name>.onnx.data (protobuf caps at 2 GiB)
DYNAMIC_AXES = {
    "clip_l": {"input_ids": {0: "B"}, "hidden_states": {0: "B"}, "text_embeds": {0: "B"}},
    "clip_g": {"input_ids": {0: "B"}, "hidden_states": {0: "B"}, "text_embeds": {0: "B"}},
    "t5": {"input_ids": {0: "B", 1: "T"}, "hidden_states": {0: "B", 1: "T"}},
    "transformer": {
        "hidden_states": {0: "B", 2: "h", 3: "w"}, "timestep": {0: "B"},
        "encoder_hidden_states": {0: "B", 1: "S"}, "pooled_projections": {0: "B"},
        "velocity": {0: "B", 2: "h", 3: "w"},
    },
    "vae_decoder": {"latent": {0: "B", 2: "h", 3: "w"}, "image": {0: "B", 2: "H", 3: "W"}},
    "vae_encoder": {"image": {0: "B", 2: "H", 3: "W"}, "latent": {0: "B", 2: "h", 3: "w"}},
}


def _eager_attention(model: nn.Module) -> nn.Module:
    """transformers' SDPA path traces to graphs the TorchScript exporter rejects in bf16 and that
    mix fp32 into fp16 LayerNorms; the eager attention exports cleanly at every precision."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # transformers 4.x
        model.config._attn_implementation = "eager"
    return model


class ClipGraph(nn.Module):
    """input_ids [B, 77] -> (penultimate hidden states [B, 77, C], pooled projection [B, C])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = _eager_attention(model)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class T5Graph(nn.Module):
    """input_ids [B, T] -> hidden states [B, T, 4096]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = _eager_attention(model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]


class VaeEncoderGraph(nn.Module):
    """image [B, 3, H, W] in [-1, 1] -> latent mean [B, 16, H/8, W/8] (unscaled), for img2img."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(image)
        return moments[:, : moments.shape[1] // 2]


def sample_inputs(config: VariantConfig, component: str, dtype: torch.dtype, vocab: int = 100) -> tuple:
    # token ids below 100 are valid for every vocab (tiny ones too)
    """Small tracing inputs (batch 2 so the batch axis is never specialised to 1)."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, vocab, (2, n), generator=g)  # noqa: E731
    b, c, h, w = config.latent_shape(2, 64, 96)  # [2, 16, 8, 12]
    if component in ("clip_l", "clip_g"):
        return (ids(config.clip_tokens),)
    if component == "t5":
        return (ids(16),)
    if component == "transformer":
        return (
            torch.randn(b, c, h, w, generator=g).to(dtype),
            torch.tensor([1000.0, 500.0]),  # timesteps stay fp32
            torch.randn(b, config.text_tokens(16), config.joint_dim, generator=g).to(dtype),
            torch.randn(b, config.pooled_dim, generator=g).to(dtype),
        )
    if component == "vae_decoder":
        return (torch.randn(b, c, h, w, generator=g).to(dtype),)
    return (torch.rand(b, 3, h * 8, w * 8, generator=g).to(dtype) * 2 - 1,)  # vae_encoder


@dataclass(frozen=True)
class GraphStats:
    bytes: int
    data: str | None  # external-data file name, when the weights were too large to inline
    qdq_pairs: int  # DequantizeLinear nodes: activation Q->DQ pairs and FP8-weight DQs
    fp8_weights: int
    quantized_linears: tuple[str, ...]
    plain_matmuls: tuple[str, ...]


def export_graph(module: nn.Module, component: str, args: tuple, out_path: Path, fp8: bool) -> GraphStats:
    """Trace `module` to `out_path` (+ `.data` when large), written atomically."""
    names_in, names_out = COMPONENT_IO[component]
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(raw), dynamo=False, opset_version=OPSET, input_names=list(names_in),
                output_names=list(names_out), dynamic_axes=DYNAMIC_AXES[component], do_constant_folding=True,
            )
        # Weights stay on disk (external data) until needed: a full-size MMDiT must fit in 24 GiB.
        model = onnx.load(str(raw), load_external_data=False)
        large = any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
        weights = 0
        if fp8:
            model, _ = to_standard_qdq(model)
        if not large:  # polygraphy folding needs the whole graph in one protobuf (< 2 GiB)
            model = fold(model)  # before FP8 weights: folding would turn DQ(fp8 weight) back into fp32
        if fp8:
            model, weights = quantize_weights(model, base_dir=Path(tmp))
        if large:
            onnx.external_data_helper.load_external_data_for_model(model, tmp)
        summary = qdq_summary(model)
        final = Path(tmp) / out_path.name
        large = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
        data_name = out_path.name + ".data"
        onnx.save(model, str(final), save_as_external_data=large, location=data_name, all_tensors_to_one_file=True)
        onnx.shape_inference.infer_shapes_path(str(final), str(final))  # by path: works beyond 2 GiB
        if large:
            os.replace(Path(tmp) / data_name, out_path.parent / data_name)
        os.replace(final, out_path)
    size = out_path.stat().st_size + (os.path.getsize(out_path.parent / data_name) if large else 0)
    return GraphStats(size, data_name if large else None, summary["dequantize"], weights, tuple(summary["quantized_linears"]), tuple(summary["plain_matmuls"]))
