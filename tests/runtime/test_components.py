"""The component table is what every side binds: exported ONNX graphs, ONNX Runtime sessions and
the TensorRT binding table all equal it (names, order and dtypes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd35trt.runtime.components import COMPONENTS, ENGINES, RUNTIME, TABLE, component, engine_profiles
from sd35trt.runtime.config import VARIANTS
from sd35trt.runtime.engine_manifest import FLOAT_DTYPES
from sd35trt.runtime.manifest import ExportManifest

onnx = pytest.importorskip("onnx", reason="onnx (export extra) reads the exported graphs")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) runs the exported graphs")
ONNX_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32"}
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64"}


def _io(values, types) -> list[tuple[str, str]]:
    return [(v.name, types[v.type.tensor_type.elem_type]) for v in values]


@pytest.mark.parametrize("fixture", ["onnx_fp32", "onnx_fp8"])
def test_exported_graphs_and_sessions_equal_the_table(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    manifest = ExportManifest.load(folder)
    assert set(manifest.components) == {c.name for c in TABLE}  # every component was exported
    for c in TABLE:
        dtypes = c.dtypes(FLOAT_DTYPES[manifest.dtype])
        want_in = [(n, dtypes[n]) for n in c.input_names]
        want_out = [(n, dtypes[n]) for n in c.output_names]
        path = folder / manifest.components[c.name].file
        graph = onnx.load(str(path), load_external_data=False).graph
        assert _io(graph.input, ONNX_TYPES) == want_in, c.name
        assert _io(graph.output, ONNX_TYPES) == want_out, c.name
        tensors = {t.name: t for t in c.inputs + c.outputs}
        for value in list(graph.input) + list(graph.output):  # the dynamic axes are the table's
            dims = value.type.tensor_type.shape.dim
            axes = {i for i, d in enumerate(dims) if d.dim_param}
            if value in graph.input:
                assert axes == set(tensors[value.name].axes), (c.name, value.name)
            else:  # shape inference may leave an output dim symbolic (the FP8 velocity's channels)
                assert set(tensors[value.name].axes) <= axes, (c.name, value.name)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [(i.name, ORT_TYPES[i.type]) for i in sess.get_inputs()] == want_in, c.name
        assert [(o.name, ORT_TYPES[o.type]) for o in sess.get_outputs()] == want_out, c.name


def test_trt_binding_table_equals_the_table(engines_fp8: dict) -> None:
    from sd35trt.runtime.backends.trt_backend import binding_table
    from sd35trt.runtime.engine_manifest import EngineManifest

    folder, rows = engines_fp8["sm89"]
    manifest = EngineManifest.load(folder)
    assert set(manifest.components) == set(COMPONENTS) and COMPONENTS == tuple(c.name for c in ENGINES)
    assert ENGINES == RUNTIME  # every component the backends load is in engine sets (the VAE encoder too)
    profiles = engine_profiles(manifest.variant, manifest.shapes.sizes, manifest.shapes.batches, manifest.shapes.cfg)
    for c in ENGINES:
        dtypes = c.dtypes(FLOAT_DTYPES[manifest.dtype])
        table = binding_table(c.name, manifest)
        assert [(b.name, b.dtype, b.is_input) for b in table] == (
            [(n, dtypes[n], True) for n in c.input_names] + [(n, dtypes[n], False) for n in c.output_names])
        assert {b.name: b.profile for b in table if b.is_input} == profiles[c.name]
        built = next(r for r in rows if r.component == c.name).report  # what TensorRT-RTX parsed
        assert [(t.name, t.dtype) for t in built.inputs] == [(n, dtypes[n]) for n in c.input_names]


def test_sample_inputs_follow_the_table_and_the_dtype_rule() -> None:
    config = VARIANTS["sd3.5-medium"]
    for c in TABLE:
        args = c.sample_inputs(config, torch.float16)
        shapes = c.shapes(config, 2, 64, 96, 16)
        assert [tuple(a.shape) for a in args] == [shapes[n] for n in c.input_names], c.name
        dtypes = c.dtypes("float16")
        assert [str(a.dtype).removeprefix("torch.") for a in args] == [dtypes[n] for n in c.input_names], c.name
    assert component("transformer").cfg_doubled and not component("vae_decoder").cfg_doubled
    with pytest.raises(Exception, match="'depth_estimator' is unknown"):
        component("depth_estimator")
    cn = component("controlnet")  # exported beside a model's graphs, not one of TABLE
    assert cn not in TABLE and not cn.runtime and not cn.engine
    args = cn.sample_inputs(config, torch.float16)
    assert [tuple(a.shape) for a in args] == [cn.shapes(config, 2, 64, 96, 16)[n] for n in cn.input_names]
    assert [c.name for c in TABLE if c.skips_blocks] == ["transformer"]
    assert component("transformer").shapes(config, 2, 64, 96)["skip_layers"] == (24,)  # one flag per block


def test_the_skip_layer_pass_fits_the_transformer_profile() -> None:
    """The SLG pass runs the transformer on the prompts' rows only: under CFG the profile's minimum
    batch is the image batch, so a static engine set takes both passes; other components stay doubled."""
    config = VARIANTS["sd3.5-medium"]
    p = engine_profiles(config, (1024,) * 3, (1, 1, 2), cfg=True)
    assert [s[0] for s in p["transformer"]["hidden_states"]] == [1, 2, 4]
    assert p["transformer"]["skip_layers"] == ((24,),) * 3
    assert [s[0] for s in p["clip_l"]["input_ids"]] == [2, 2, 4]
    assert p["vae_encoder"]["image"] == ((1, 3, 1024, 1024), (1, 3, 1024, 1024), (2, 3, 1024, 1024))
