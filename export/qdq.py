"""FP8 Q/DQ in standard ONNX, and graph cleanup (onnx-graphsurgeon + polygraphy).

ModelOpt's TorchScript export emits `trt::TRT_FP8QuantizeLinear` / `trt::TRT_FP8DequantizeLinear`
(scale input only). TensorRT and ONNX Runtime both read the standard opset-19 form instead:
QuantizeLinear / DequantizeLinear with a float8e4m3fn zero point. `to_standard_qdq` rewrites
the nodes in place; `fold` then folds constant subgraphs, which turns Q(weight) into an FP8
initializer, so weights are stored in 1 byte each.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

TRT_Q, TRT_DQ = "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"
FP8 = onnx.TensorProto.FLOAT8E4M3FN
E4M3_MAX = 448.0


def to_standard_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite trt-domain FP8 Q/DQ into standard Q/DQ; returns (model, pairs converted)."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.ir.tensor import LazyValues

    graph = gs.import_onnx(model)
    zero = gs.Constant("fp8_zero_point", LazyValues(onnx.helper.make_tensor("fp8_zero_point", FP8, [], [0])))
    converted = 0
    for node in graph.nodes:
        if node.op not in (TRT_Q, TRT_DQ):
            continue
        node.op = "QuantizeLinear" if node.op == TRT_Q else "DequantizeLinear"
        node.domain = None
        node.inputs.append(zero)
        node.attrs = {}
        if node.op == "QuantizeLinear":
            converted += 1
            for out in node.outputs:  # uint8 placeholder type -> real fp8 type
                out.dtype = FP8
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    keep = [o for o in out.opset_import if o.domain != "trt"]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return _with_opset(out, 19), converted


def _array(const, base_dir: Path | None):
    """A gs.Constant's values; weights kept as external data are read from `base_dir` one at a time."""
    import numpy as np
    from onnx import external_data_helper, numpy_helper

    tensor = getattr(const._values, "tensor", None)
    if tensor is not None and external_data_helper.uses_external_data(tensor):
        loaded = onnx.TensorProto()
        loaded.CopyFrom(tensor)
        external_data_helper.load_external_data_for_tensor(loaded, str(base_dir))
        loaded.data_location = onnx.TensorProto.DEFAULT
        return np.asarray(numpy_helper.to_array(loaded), dtype=np.float32)
    return np.asarray(const.values, dtype=np.float32)


def quantize_weights(model: onnx.ModelProto, base_dir: Path | None = None) -> tuple[onnx.ModelProto, int]:
    """Store Q(weight) as an FP8 initializer feeding its DQ (1 byte per weight on disk).

    A Transpose right after the weight's DQ (how Linear exports for 3-D inputs) is folded into
    the stored weight, so the DQ feeds the MatMul directly, the pattern TensorRT fuses. Weights
    held as external data (models > 2 GiB) are streamed from `base_dir`, one tensor at a time.
    """
    import numpy as np
    import onnx_graphsurgeon as gs
    import torch
    from onnx_graphsurgeon.ir.tensor import LazyValues

    def const(t):  # an initializer, or the value of a Constant node (unfolded graphs)
        if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
            return t.inputs[0].attrs["value"]
        return t

    graph = gs.import_onnx(model)
    done = 0
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        w, scale = const(q.inputs[0]), const(q.inputs[1])
        if not (isinstance(w, gs.Constant) and isinstance(scale, gs.Constant)) or len(q.outputs[0].outputs) != 1:
            continue
        dq = q.outputs[0].outputs[0]
        values = _array(w, base_dir) / np.float32(np.asarray(scale.values, dtype=np.float32))
        users = dq.outputs[0].outputs
        if len(users) == 1 and users[0].op == "Transpose":
            values = values.transpose(users[0].attrs.get("perm"))
            for consumer in list(users[0].outputs[0].outputs):
                consumer.inputs[consumer.inputs.index(users[0].outputs[0])] = dq.outputs[0]
            users[0].outputs.clear()
        fp8 = torch.from_numpy(np.ascontiguousarray(values)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        raw = fp8.view(torch.uint8).numpy().tobytes()
        name = f"{w.name}_fp8"
        tensor = onnx.helper.make_tensor(name, FP8, list(values.shape), raw, raw=True)
        dq.inputs[0] = gs.Constant(name, LazyValues(tensor))
        dq.outputs[0].shape = list(values.shape)
        q.outputs.clear()
        done += 1
    graph.cleanup().toposort()
    return gs.export_onnx(graph), done


def _with_opset(model: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < minimum:
            op.version = minimum
    return model


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node cleanup with polygraphy (ONNX Runtime evaluates constants)."""
    from polygraphy.backend.onnx import fold_constants

    return fold_constants(model, num_passes=2, allow_onnxruntime_shape_inference=False, error_ok=False)


def qdq_summary(model: onnx.ModelProto) -> dict[str, object]:
    """Q/DQ counts, the layers whose MatMul/Gemm takes an FP8 weight *and* a Q/DQ'd activation
    (named by their weight, e.g. "transformer_blocks.0.attn.to_q"), and the other MatMul/Gemm nodes."""
    producers = {o: n for n in model.graph.node for o in n.output}
    fp8_inits = {i.name for i in model.graph.initializer if i.data_type == FP8}
    ops = Counter(n.op_type for n in model.graph.node)
    quantized, plain = [], []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        srcs = [producers.get(i) for i in node.input[:2]]
        if all(p is not None and p.op_type == "DequantizeLinear" for p in srcs) and srcs[1].input[0] in fp8_inits:
            quantized.append(srcs[1].input[0].removesuffix("_fp8").removesuffix(".weight"))
        else:
            plain.append(node.name)
    return {
        "quantize": ops["QuantizeLinear"],
        "dequantize": ops["DequantizeLinear"],
        "fp8_initializers": len(fp8_inits),
        "quantized_linears": quantized,
        "plain_matmuls": plain,
    }
