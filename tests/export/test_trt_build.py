"""Real TensorRT-RTX engine builds on the CPU (AOT) from tiny FP8 / FP32 ONNX graphs."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest

from sd35trt.export.trt_build import BuildReport, EngineBuildError, TensorSpec, build_engine
from sd35trt.runtime.errors import InvalidInputError

trt = pytest.importorskip(
    "tensorrt_rtx_bindings",
    reason="tensorrt_rtx_bindings not importable: pip install 'sd35trt[trt-rtx]' "
    "(tensorrt-rtx-cu12-libs + tensorrt-rtx-cu12-bindings)",
)
onnx = pytest.importorskip("onnx", reason="onnx is needed to write the test graphs")
import ml_dtypes  # noqa: E402  (an onnx dependency: numpy float8_e4m3fn)
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

PROFILE = {"x": ((1, 64), (2, 64), (8, 64))}
# Engine header as observed for tensorrt-rtx 1.7.1.116 (pinned in pyproject's trt-rtx extra):
# b"vtrt" magic, byte 32 = bit mask of target compute capabilities (undocumented; decoded from
# engines built here: sm80 0x02, sm86 0x04, sm89 0x08, sm120 0x10, sm121 0x20, none set 0x7e).
# The runtime's get_engine_validity() would say this too, but it needs a GPU.
CC_BIT = {"sm89": 0x08, "sm120": 0x10}


def _tiny_onnx(path: Path, *, fp8: bool, opset: int = 19, external: bool = False) -> Path:
    """x [B, 64] -> (Q/DQ fp8) -> MatMul W [64, 32] (fp8 DQ weight) -> + bias -> y [B, 32]."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 32)) * 0.1).astype(np.float32)  # [64, 32]
    inits = [numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "bias")]
    nodes = []
    if fp8:
        w_scale = float(np.abs(w).max() / 448.0)
        inits += [
            numpy_helper.from_array((w / w_scale).astype(ml_dtypes.float8_e4m3fn), "w_q"),
            numpy_helper.from_array(np.array(w_scale, np.float32), "w_scale"),
            numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
            numpy_helper.from_array(np.zeros((), ml_dtypes.float8_e4m3fn), "x_zp"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),  # [B, 64] fp8
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"]),  # [64, 32] fp32
            helper.make_node("MatMul", ["x_dq", "w"], ["mm"]),
        ]
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["mm"]))
    nodes.append(helper.make_node("Add", ["mm", "bias"], ["y"]))  # [B, 32]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if fp8:
        assert model.graph.initializer[1].data_type == TensorProto.FLOAT8E4M3FN
    model.ir_version = 10 if opset >= 21 else 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path, save_as_external_data=external, location=f"{path.name}.data",
              size_threshold=0)
    return path


def _check_engine(report: BuildReport, engine: Path, cc: str) -> None:
    data = engine.read_bytes()
    assert engine.is_file() and len(data) > 0 and report.engine_bytes == len(data)
    assert data[:4] == b"vtrt", f"unexpected engine magic {data[:4]!r} ({trt.__version__})"
    assert data[32] == CC_BIT[cc], f"header cc mask {data[32]:#x}, wanted {cc} ({trt.__version__})"
    assert report.inputs == (TensorSpec("x", "float32", (-1, 64)),)
    assert report.outputs == (TensorSpec("y", "float32", (-1, 32)),)
    assert report.profile == PROFILE
    assert (report.flavor, report.compute_capability) == ("tensorrt-rtx", cc)
    assert report.trt_version == trt.__version__
    assert report.build_seconds > 0 and report.peak_rss_mib > 0
    assert [p.name for p in engine.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("cc", ["sm89", "sm120"])
@pytest.mark.parametrize("fp8,opset", [(True, 19), (True, 21), (False, 19)],
                         ids=["fp8-opset19", "fp8-opset21", "fp32"])
def test_builds_on_cpu_for_target(tmp_path: Path, fp8: bool, opset: int, cc: str) -> None:
    src = _tiny_onnx(tmp_path / "tiny.onnx", fp8=fp8, opset=opset)
    engine = tmp_path / "out" / f"tiny-{cc}.engine"
    _check_engine(build_engine(src, engine, compute_capability=cc, profiles=PROFILE), engine, cc)


def test_fp8_weights_stay_fp8_in_the_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = {}
    for fp8 in (True, False):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="sd35trt.export.trt_build"):
            src = _tiny_onnx(tmp_path / f"{fp8}.onnx", fp8=fp8)
            build_engine(src, tmp_path / f"{fp8}.engine", profiles=PROFILE)
        found = re.findall(r"Total Weights Memory: (\d+) bytes", caplog.text)
        assert found, "TensorRT-RTX no longer logs 'Total Weights Memory'"
        weights[fp8] = int(found[-1])
    # 64x32 weights: 1 byte each as FP8 (+ bias, scales) vs 4 bytes each as FP32.
    assert weights[False] >= 64 * 32 * 4 and weights[True] < 64 * 32 * 2, weights


def test_external_data_and_atomic_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model").mkdir()
    src = _tiny_onnx(tmp_path / "model" / "ext.onnx", fp8=True, external=True)
    assert (tmp_path / "model" / "ext.onnx.data").stat().st_size > 64 * 32
    engine = tmp_path / "out" / "ext.engine"
    engine.parent.mkdir()
    engine.write_bytes(b"stale")
    monkeypatch.chdir(tmp_path / "out")  # the data file is found next to the ONNX, not the cwd
    _check_engine(build_engine(src, engine, profiles=PROFILE), engine, "sm89")
    assert os.stat(engine).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("kind", ["text", "garbage", "empty", "truncated", "dangling-input"])
def test_malformed_onnx_names_the_file(tmp_path: Path, kind: str) -> None:
    bad = tmp_path / f"{kind}.onnx"
    if kind == "dangling-input":
        model = onnx.load(_tiny_onnx(tmp_path / "ok.onnx", fp8=True))
        model.graph.node[3].input[1] = "missing_weight"  # MatMul reads an undefined tensor
        onnx.save(model, bad)
    else:
        good = _tiny_onnx(tmp_path / "ok.onnx", fp8=True).read_bytes()
        bad.write_bytes({"text": b"this is not an onnx file", "garbage": b"not an onnx model",
                         "empty": b"", "truncated": good[: len(good) // 2]}[kind])
    engine = tmp_path / "never.engine"
    with pytest.raises(EngineBuildError, match=re.escape(str(bad))) as err:
        build_engine(bad, engine, profiles=PROFILE)
    # The parser's own reason, or ours: an empty file and some text decode as an empty protobuf.
    why = {"text": "not an ONNX model", "garbage": "MODEL_DESERIALIZE_FAILED",
           "empty": "not an ONNX model", "truncated": "MODEL_DESERIALIZE_FAILED",
           "dangling-input": "MatMul"}[kind]
    assert why in str(err.value)
    assert not engine.exists() and not list(tmp_path.glob("*.tmp"))


def test_fp8_on_a_gpu_without_fp8_fails_with_the_builders_reason(tmp_path: Path) -> None:
    src = _tiny_onnx(tmp_path / "tiny.onnx", fp8=True)
    with pytest.raises(EngineBuildError, match=r"(?s)tiny\.onnx.*sm86.*fp8"):
        build_engine(src, tmp_path / "x.engine", compute_capability="sm86", profiles=PROFILE)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    src = _tiny_onnx(tmp_path / "tiny.onnx", fp8=False)
    out = tmp_path / "x.engine"
    with pytest.raises(EngineBuildError, match=r"dynamic inputs without.*x\[-1, 64\]"):
        build_engine(src, out)  # x has a dynamic batch, so a profile is required
    with pytest.raises(EngineBuildError, match="does not fit input 'x'"):
        build_engine(src, out, profiles={"x": ((1, 63), (2, 63), (8, 63))})
    with pytest.raises(EngineBuildError, match=r"unknown \['z'\]"):
        build_engine(src, out, profiles={**PROFILE, "z": ((1,), (1,), (1,))})
    with pytest.raises(InvalidInputError, match="min <= opt <= max"):
        build_engine(src, out, profiles={"x": ((4, 64), (2, 64), (8, 64))})
    with pytest.raises(InvalidInputError, match="compute_capability='sm90'"):
        build_engine(src, out, compute_capability="sm90", profiles=PROFILE)
    with pytest.raises(InvalidInputError, match="flavor='trt'"):
        build_engine(src, out, flavor="trt", profiles=PROFILE)
    with pytest.raises(EngineBuildError, match="does not exist"):
        build_engine(tmp_path / "nope.onnx", out, profiles=PROFILE)
    assert not out.exists()


@pytest.mark.parametrize("cc", ["sm89", "sm120"])
def test_exported_fp8_transformer_builds(onnx_fp8: Path, tmp_path: Path, cc: str) -> None:
    """The tiny FP8 MMDiT from `sd35trt export` parses and builds with TensorRT-RTX on the CPU."""
    from sd35trt.runtime.manifest import ExportManifest

    config = ExportManifest.load(onnx_fp8).variant
    profiles = config.engine_profiles(sizes=(64, 128, 256), batches=(1, 1, 2))["transformer"]
    report = build_engine(onnx_fp8 / "transformer.onnx", tmp_path / "transformer.engine",
                          compute_capability=cc, profiles=profiles)
    assert report.engine_bytes > 0 and (tmp_path / "transformer.engine").stat().st_size == report.engine_bytes
    assert [i.name for i in report.inputs] == ["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections",
                                               "skip_layers"]  # the SLG-capable graph: one engine for both passes
    assert report.profile["skip_layers"] == ((config.transformer.num_layers,),) * 3
    assert [o.name for o in report.outputs] == ["velocity"]
    assert report.profile["hidden_states"] == profiles["hidden_states"]


def test_weight_streaming_and_opt_level_are_applied_and_reported(tmp_path: Path) -> None:
    src = _tiny_onnx(tmp_path / "tiny.onnx", fp8=True)
    engine = tmp_path / "ws.engine"
    report = build_engine(src, engine, profiles=PROFILE, weight_streaming=True, opt_level=1)
    _check_engine(report, engine, "sm89")
    assert report.flags == {"opt_level": 1, "refit": False, "weight_streaming": True}
    assert 0 < report.build_peak_rss_mib <= report.peak_rss_mib + 1  # sampled during this build only


def test_options_tensorrt_rtx_lacks_are_refused_before_parsing(tmp_path: Path) -> None:
    src = tmp_path / "never-read.onnx"  # does not exist: the refusal comes first
    with pytest.raises(InvalidInputError, match="refit: TensorRT-RTX 1.7.1.116 fails REFIT builds"):
        build_engine(src, tmp_path / "x.engine", refit=True)
    with pytest.raises(InvalidInputError, match="timing_cache: .*no-ops"):
        build_engine(src, tmp_path / "x.engine", timing_cache=tmp_path / "cache.bin")
    assert not (tmp_path / "cache.bin").exists()
