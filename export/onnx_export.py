"""torch -> ONNX for one component: trace, standard FP8 Q/DQ, fold, save (external data), infer shapes.

Graphs use opset 19 (float8 QuantizeLinear/DequantizeLinear); input/output names, dynamic axes
(batch, latent height and width, T5 length) and tracing samples come from the component table
(`runtime/components.py`). The TorchScript exporter is used because ModelOpt's quantizers export
through it.
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

from ..runtime.components import Component, component
from ..runtime.files import TEMP_SUFFIX, sha256_file
from ..runtime.models.loader import TextGraph
from .qdq import fold, qdq_summary, quantize_weights, to_standard_qdq

OPSET = 19
EXTERNAL_DATA_BYTES = 1 << 30  # weights beyond 1 GiB go to <name>.onnx.data (protobuf caps at 2 GiB)


def _eager_attention(model: nn.Module) -> nn.Module:
    """transformers' SDPA path traces to graphs the TorchScript exporter rejects in bf16 and that
    mix fp32 into fp16 LayerNorms; the eager attention exports cleanly at every precision."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # transformers 4.x
        model.config._attn_implementation = "eager"
    return model


@dataclass(frozen=True)
class GraphStats:
    bytes: int
    data: str | None  # external-data file name, when the weights were too large to inline
    data_sha256: str | None  # its content hash (the graph's own is taken by the caller)
    qdq_pairs: int  # DequantizeLinear nodes: activation Q->DQ pairs and FP8-weight DQs
    fp8_weights: int
    quantized_linears: tuple[str, ...]
    plain_matmuls: tuple[str, ...]


def export_graph(module: nn.Module, name: str, args: tuple, out_path: Path, fp8: bool,
                 spec: Component | None = None) -> GraphStats:
    """Trace `module` (component `name`, signature as in the component table, or as `spec` says:
    a ControlNet export's transformer) to `out_path` (+ `.data` when large), written atomically."""
    spec = spec or component(name)
    if isinstance(module, TextGraph):
        _eager_attention(module.model)
    # A killed run leaves this folder behind; the next `export` removes it (files.remove_temporaries).
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", suffix=TEMP_SUFFIX, dir=out_path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(raw), dynamo=False, opset_version=OPSET, input_names=list(spec.input_names),
                output_names=list(spec.output_names), dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
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
        data_sha256 = sha256_file(Path(tmp) / data_name) if large else None  # before it moves into place
        if large:
            os.replace(Path(tmp) / data_name, out_path.parent / data_name)
        os.replace(final, out_path)
    size = out_path.stat().st_size + (os.path.getsize(out_path.parent / data_name) if large else 0)
    return GraphStats(size, data_name if large else None, data_sha256, summary["dequantize"], weights,
                      tuple(summary["quantized_linears"]), tuple(summary["plain_matmuls"]))
