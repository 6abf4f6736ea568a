"""Exported graphs vs torch: every component (fp32) and the FP8 transformer vs ModelOpt fake quant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sd35trt.export.calibrate import DEFAULT_EXCLUDE, CalibState, apply_calibration
from sd35trt.export.qdq import FP8, qdq_summary
from sd35trt.runtime import Pipeline
from sd35trt.runtime.components import component

ort = pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) runs the exported graphs")


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def _inputs(pipe: Pipeline, comp: str) -> tuple[torch.Tensor, ...]:
    """Shapes unlike the traced ones (batch 3, 80x112 px, 24 T5 tokens): dynamic axes must hold."""
    g = torch.Generator().manual_seed(11)
    cfg = pipe.config
    b, c, h, w = cfg.latent_shape(3, 80, 112)
    if comp in ("clip_l", "clip_g"):
        return (torch.randint(0, 400, (3, 77), generator=g),)
    if comp == "t5":
        return (torch.randint(0, 400, (3, 24), generator=g),)
    if comp == "transformer":
        return (torch.randn(b, c, h, w, generator=g), torch.tensor([1000.0, 611.5, 3.2]),
                torch.randn(b, cfg.text_tokens(24), cfg.joint_dim, generator=g), torch.randn(b, cfg.pooled_dim, generator=g),
                torch.zeros(cfg.transformer.num_layers))  # skip_layers [L]: no block skipped
    return (torch.randn(b, c, h, w, generator=g),)


def _torch_module(pipe: Pipeline, comp: str):
    return pipe.backend.modules[comp]  # the module the torch backend runs (the table's signature)


# rel. L2 of each fp32 graph's outputs vs torch, bounds ~15x above what is seen:
# seen clip_l 3.0e-7, clip_g 3.4e-7, t5 3.0e-7, transformer 1.7e-7, vae_decoder 1.7e-6
FP32_REL_L2 = {"clip_l": 5e-6, "clip_g": 5e-6, "t5": 5e-6, "transformer": 3e-6, "vae_decoder": 3e-5}


@pytest.mark.parametrize("comp", list(FP32_REL_L2))
def test_fp32_graph_matches_torch(onnx_fp32: Path, tiny_medium: Path, comp: str) -> None:
    pipe = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)
    args = _inputs(pipe, comp)
    with torch.no_grad():
        ref = _torch_module(pipe, comp)(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    sess = ort.InferenceSession(str(onnx_fp32 / f"{comp}.onnx"), providers=["CPUExecutionProvider"])
    names_in, names_out = component(comp).input_names, component(comp).output_names
    outs = sess.run(list(names_out), {n: a.numpy() for n, a in zip(names_in, args)})
    for o, r in zip(outs, ref):
        assert o.shape == tuple(r.shape)
        assert _rel_l2(o, r.numpy()) <= FP32_REL_L2[comp]


@pytest.mark.parametrize("fixture", ["onnx_fp32", "onnx_fp8"])
def test_transformer_graph_skips_the_blocks_its_input_names(fixture: str, tiny_medium: Path,
                                                             request: pytest.FixtureRequest) -> None:
    """skip_layers = 1 on blocks 1 and 2 == our MMDiT run with skip_layers=(1, 2) (the blocks not run;
    FP8: the fake-quant model), and != the graph with no block skipped: one graph, both passes."""
    folder: Path = request.getfixturevalue(fixture)
    pipe = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)
    model = pipe.backend.transformer.model
    if fixture == "onnx_fp8":
        model = apply_calibration(model, CalibState.load(folder / "calibration"))
    *args, skip = _inputs(pipe, "transformer")
    skip[[1, 2]] = 1.0  # [L]
    with torch.no_grad():
        ref = model(*args, skip_layers=(1, 2)).numpy()
    sess = ort.InferenceSession(str(folder / "transformer.onnx"), providers=["CPUExecutionProvider"])
    feed = {n: a.numpy() for n, a in zip(component("transformer").input_names, (*args, skip))}
    out = sess.run(["velocity"], feed)[0]
    plain = sess.run(["velocity"], {**feed, "skip_layers": np.zeros_like(feed["skip_layers"])})[0]
    assert _rel_l2(out, ref) <= (1e-2 if fixture == "onnx_fp8" else 1e-4)
    assert _rel_l2(plain, out) > 0.05


def test_fp8_transformer_matches_modelopt_fake_quant(onnx_fp8: Path, tiny_medium: Path) -> None:
    pipe = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)
    plain = pipe.backend.transformer.model
    args = _inputs(pipe, "transformer")
    with torch.no_grad():
        high = plain(*args).numpy()
    fake = apply_calibration(plain, CalibState.load(onnx_fp8 / "calibration"))
    with torch.no_grad():
        ref = fake(*args).numpy()
    sess = ort.InferenceSession(str(onnx_fp8 / "transformer.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(["velocity"], {n: a.numpy() for n, a in zip(component("transformer").input_names, args)})[0]
    err = _rel_l2(out, ref)
    assert err <= 1e-5  # seen 6.5e-7
    # the fake quant's own effect must be >= 100x that bound (seen 5.9e-3): an unquantized graph fails above
    assert _rel_l2(ref, high) >= 100 * 1e-5


def test_fp8_graph_has_qdq_on_every_block_linear_and_none_on_exclusions(onnx_fp8: Path, tiny_medium: Path) -> None:
    model = onnx.load(str(onnx_fp8 / "transformer.onnx"))
    summary = qdq_summary(model)
    to_module = lambda node: ".".join(node.strip("/").split("/")[:-1])  # noqa: E731  /a/b/MatMul -> a.b
    quantized = set(summary["quantized_linears"])
    pipe = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)
    linears = {n for n, m in pipe.backend.transformer.model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {n for n in linears if not n.startswith(DEFAULT_EXCLUDE)}
    assert quantized == expected
    excluded = {to_module(n) for n in summary["plain_matmuls"]} & linears
    assert excluded == linears - expected and excluded
    assert summary["fp8_initializers"] >= len(expected)  # weights stored as FP8
    assert all(i.data_type != FP8 for i in model.graph.initializer if "context_embedder" in i.name)
    assert {d.domain for d in model.opset_import} <= {"", "ai.onnx"}  # no trt-domain ops left
    assert max(d.version for d in model.opset_import if d.domain in ("", "ai.onnx")) >= 19
    assert not [n for n in model.graph.node if n.domain == "trt"]
    zps = [n.input[2] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    inits = {i.name: i for i in model.graph.initializer}
    assert all(inits[z].data_type == FP8 and onnx.numpy_helper.to_array(inits[z]).astype(np.float32) == 0 for z in set(zps))


def test_fp8_weights_take_one_byte(onnx_fp8: Path, onnx_fp32: Path, tiny_medium: Path) -> None:
    model = onnx.load(str(onnx_fp8 / "transformer.onnx"))
    fp8_bytes = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type == FP8)
    pipe = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)
    mods = dict(pipe.backend.transformer.model.named_modules())
    quantized = qdq_summary(model)["quantized_linears"]
    assert fp8_bytes == 1 + sum(mods[n].weight.numel() for n in quantized)  # + the zero point
    saved = 3 * (fp8_bytes - 1)
    assert (onnx_fp8 / "transformer.onnx").stat().st_size <= (onnx_fp32 / "transformer.onnx").stat().st_size - saved + 200_000


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_text_encoders_export_and_build(tiny_medium: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    """Real engines use fp16/bf16 outside the FP8 MMDiT: the text encoder graphs must export and
    pass TensorRT's strongly typed parser (one dtype per LayerNorm, no fp32 leaks)."""
    from sd35trt.export.onnx_export import export_graph

    pipe = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=dtype)
    want = {torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}[dtype]
    for comp, module in (("clip_l", pipe.backend.modules["clip_l"]), ("t5", pipe.backend.modules["t5"])):
        path = tmp_path / f"{comp}.onnx"
        export_graph(module, comp, component(comp).sample_inputs(pipe.config, dtype), path, fp8=False)
        graph = onnx.load(str(path))
        assert graph.graph.output[0].type.tensor_type.elem_type == want
        pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (trt-rtx extra) parses the graph")
        from sd35trt.export.trt_build import build_engine

        n = 77 if comp == "clip_l" else 16
        report = build_engine(path, tmp_path / f"{comp}.engine", profiles={"input_ids": ((1, n), (2, n), (2, n))})
        assert report.engine_bytes > 0
