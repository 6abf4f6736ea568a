"""`sd35trt export --controlnet PATH`: ONNX Runtime runs the ControlNet (fp32 equals torch, FP8 with
the joint calibration keeps the final latents), TensorRT-RTX builds the residual transformer and the
ControlNet for sm89, the manifests record which ControlNet (a changed one is re-exported, a foreign
one refused), and bad input fails before any graph loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.cli import main
from sd35trt.runtime import Pipeline
from sd35trt.runtime.errors import CheckpointError, InvalidInputError
from sd35trt.runtime.manifest import ExportManifest

pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) runs the exported graphs")
pytest.importorskip("modelopt", reason="nvidia-modelopt (export extra) calibrates FP8")
pytest.importorskip("diffusers", reason="diffusers (test extra) writes the tiny ControlNets")
from sd35trt.export.calibrate import CalibSettings  # noqa: E402
from sd35trt.export.controlnet_export import calib_control_images  # noqa: E402
from sd35trt.export.exporter import ExportOptions, export_model  # noqa: E402
from sd35trt.export.tiny_controlnet import write_tiny_controlnet  # noqa: E402

CALIB = CalibSettings(num_prompts=2, steps=4, height=64, width=64, seed=0)


@pytest.fixture(scope="module")
def nets(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cn-nets")
    return {f"r{n}": write_tiny_controlnet(tiny_models["large"], root / f"r{n}", "large", n, seed=n) for n in (2, 3)}


@pytest.fixture(scope="module")
def onnx_cn(tiny_models: dict[str, Path], nets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx-cn") / "fp32"
    rc = main(["export", "--model", str(tiny_models["large"]), "--out", str(out), "--precision", "fp32",
               "--controlnet", str(nets["r3"]), "--quiet"])  # the CLI wiring, once
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def fp8_cn(tiny_models: dict[str, Path], nets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx-cn") / "fp8"
    export_model(tiny_models["large"], out, ExportOptions(precision="fp8", dtype="fp32", calib=CALIB,
                                                          controlnet=str(nets["r3"])), progress=False)
    return out


def _run(pipe: Pipeline, control: bool = True, output_type: str = "np") -> np.ndarray:
    image = calib_control_images(2, 64, 64, seed=21)
    kw = dict(negative_prompt="blurry", height=64, width=64, num_inference_steps=5, guidance_scale=4.5,
              output_type=output_type, progress=False, generator=torch.Generator().manual_seed(4))
    if control:
        kw.update(control_image=image, controlnet_conditioning_scale=0.7, control_guidance_start=0.0,
                  control_guidance_end=0.6, control_generator=torch.Generator().manual_seed(5))
    out = pipe(["a lighthouse at dusk", "a red fox in snow"], **kw).images
    return np.asarray(out.float() if isinstance(out, torch.Tensor) else out, dtype=np.float64)


def test_fp32_export_runs_the_controlnet_as_torch(onnx_cn: Path, tiny_models: dict[str, Path],
                                                 nets: dict[str, Path], capsys) -> None:
    doc = json.loads((onnx_cn / "manifest.json").read_text())
    assert doc["controlnet"]["residuals"] == 3 and doc["controlnet"]["source"] == str(nets["r3"].resolve())
    assert "controlnet" in doc["components"] and "--controlnet" in ExportManifest.load(onnx_cn).export_command(onnx_cn)
    with Pipeline.from_pretrained(onnx_cn, controlnet=nets["r3"]) as pipe:  # ONNX Runtime: the folder's backend
        assert pipe.backend.name == "onnxruntime"
        got, got_plain = _run(pipe), _run(pipe, control=False)  # CFG, 2 prompts, scale 0.7, window 0..0.6
    with Pipeline.from_pretrained(tiny_models["large"], backend="torch", device="cpu", dtype=torch.float32,
                                  controlnet=nets["r3"]) as ref_pipe:
        want, want_plain = _run(ref_pipe), _run(ref_pipe, control=False)
    err, err_plain = float(np.abs(got - want).max()), float(np.abs(got_plain - want_plain).max())
    with capsys.disabled():
        print(f"\n[ORT --controlnet export vs torch, max abs: with control {err:.2e}, zero residuals {err_plain:.2e}]")
    assert err <= 1e-3  # seen 2.5e-6 (np images in [0, 1])
    assert err_plain <= 1e-3  # the same graph without control images (zero residuals, broadcast); seen 2.6e-6
    assert float(np.abs(want - want_plain).max()) > 1e-2  # the ControlNet changes the images


def test_fp8_export_with_joint_calibration_keeps_the_final_latents(fp8_cn: Path, tiny_models: dict[str, Path],
                                                                  nets: dict[str, Path], capsys) -> None:
    m = ExportManifest.load(fp8_cn)
    assert m.components["controlnet"].precision == m.components["transformer"].precision == "fp8"
    assert m.components["controlnet"].qdq_pairs > 0
    fps = [json.loads((fp8_cn / d / "amax.json").read_text())["meta"]["fingerprint"]
           for d in ("calibration", "controlnet_calibration")]
    assert fps[0] == fps[1]  # made together
    with Pipeline.from_pretrained(fp8_cn, controlnet=nets["r3"]) as pipe:
        got = _run(pipe, output_type="latent").ravel()
    with Pipeline.from_pretrained(tiny_models["large"], backend="torch", device="cpu", dtype=torch.float32,
                                  controlnet=nets["r3"]) as ref_pipe:
        ref = _run(ref_pipe, output_type="latent").ravel()
    cos = float(np.dot(got, ref) / (np.linalg.norm(got) * np.linalg.norm(ref)))
    with capsys.disabled():
        print(f"\n[ORT FP8 --controlnet export vs torch fp32, final-latent cosine: {cos:.5f}]")
    assert cos >= 0.99 and not np.array_equal(got, ref)


def test_trt_rtx_builds_the_residual_transformer_and_the_controlnet_for_sm89(fp8_cn: Path, nets: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_rtx_bindings", reason="pip install 'sd35trt[trt-rtx]' builds engines on the CPU")
    from sd35trt.export.engines import build_engines, default_out_dir
    from sd35trt.runtime.backends.trt_backend import TensorRTRtxBackend, binding_table
    from sd35trt.runtime.engine_manifest import EngineManifest, check_engine_files

    assert default_out_dir(fp8_cn, "sm89").name.endswith("-fp8-r3-sm89")  # beside the plain set
    rows = build_engines(fp8_cn, tmp_path, gpu="sm89")
    assert [r.component for r in rows][-1] == "controlnet" and all(r.status == "built" for r in rows)
    m = EngineManifest.load(tmp_path)
    assert m.controlnet == ExportManifest.load(fp8_cn).controlnet and m.residuals == 3
    check_engine_files(m, tmp_path)
    inputs = {t["name"]: t for t in m.components["transformer"].inputs}  # as the parsed network declares them
    assert inputs["controlnet_residuals"]["shape"][0] == 3 and inputs["controlnet_residuals"]["shape"][3] == 32
    lo, _, hi = m.components["transformer"].profiles["controlnet_residuals"]
    n = (m.shapes.sizes[0] // 16) ** 2  # h*w/p^2 at the static default size
    assert lo == [3, 1, n, 32] and hi == [3, 2, n, 32]  # [R, B, N, D]: the skip pass's [B] .. [2B] under CFG
    assert [b.name for b in binding_table("transformer", m)][5] == "controlnet_residuals"
    assert m.components["controlnet"].precision == "fp8"
    TensorRTRtxBackend.check_controlnet(tmp_path, m.variant, nets["r3"])  # fits (no GPU needed)
    with pytest.raises(InvalidInputError, match=r"gives 2 residuals.*takes 3.*--controlnet .*r2.*sd35trt build"):
        TensorRTRtxBackend.check_controlnet(tmp_path, m.variant, nets["r2"])
    assert build_engines(fp8_cn, tmp_path, gpu="sm89")[-1].status == "unchanged"


def test_an_engine_set_without_a_controlnet_is_refused_before_loading(engines_fp8: dict, nets: dict[str, Path]) -> None:
    folder = engines_fp8["sm89"][0]
    with pytest.raises(InvalidInputError, match=r"exported without a ControlNet.*--controlnet .*r3.*sd35trt build"):
        Pipeline.from_pretrained(folder, controlnet=nets["r3"])  # before any engine (or CUDA) is touched


def test_bad_controlnets_are_refused_before_any_graph_loads(onnx_cn: Path, onnx_fp32: Path, nets: dict[str, Path],
                                                           tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"exported without a ControlNet.*sd35trt export .*--controlnet"):
        Pipeline.from_pretrained(onnx_fp32, controlnet=nets["r3"])
    broken = shutil.copytree(onnx_cn, tmp_path / "broken")
    (broken / "transformer.onnx").write_bytes(b"truncated")  # loading it would fail its hash check
    with pytest.raises(InvalidInputError, match=r"gives 2 residuals, but the transformer graph .* takes 3"):
        Pipeline.from_pretrained(broken, controlnet=nets["r2"])
    with pytest.raises(CheckpointError, match="does not match"):
        Pipeline.from_pretrained(broken, controlnet=nets["r3"])  # it fits: the graphs load, and this one is bad


def test_a_changed_controlnet_is_re_exported_and_refused_until_then(onnx_cn: Path, tiny_models: dict[str, Path],
                                                                   nets: dict[str, Path], tmp_path: Path) -> None:
    out, cn = shutil.copytree(onnx_cn, tmp_path / "onnx"), shutil.copytree(nets["r3"], tmp_path / "cn")
    opts = ExportOptions(precision="fp32", controlnet=str(cn))
    rows = export_model(tiny_models["large"], out, opts, progress=False)
    assert all(r.status == "cached" for r in rows)  # same content elsewhere: nothing to redo
    assert ExportManifest.load(out).controlnet["source"] == str(cn.resolve())
    other = write_tiny_controlnet(tiny_models["large"], tmp_path / "other", "large", 3, seed=8)
    weights = "diffusion_pytorch_model.safetensors"
    shutil.copyfile(other / weights, cn / weights)
    with pytest.raises(CheckpointError, match=r"is not the ControlNet .* re-export: sd35trt export .*--controlnet"):
        Pipeline.from_pretrained(out, controlnet=cn)
    rows = export_model(tiny_models["large"], out, opts, progress=False)
    assert {r.component for r in rows if r.status == "exported"} == {"transformer", "controlnet"}
    Pipeline.from_pretrained(out, controlnet=cn).close()
    plain = export_model(tiny_models["large"], out, ExportOptions(precision="fp32"), progress=False)
    assert {r.component for r in plain if r.status == "exported"} == {"transformer"}  # back to the plain graph
    assert ExportManifest.load(out).controlnet is None and "controlnet" not in ExportManifest.load(out).components


def test_export_refuses_a_bad_controlnet_flag(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    argv = ["export", "--model", str(tiny_models["large"]), "--out", str(tmp_path / "o"), "--controlnet", str(tmp_path)]
    assert main(argv) == 2
    assert "no config.json there" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_residual_graph_costs_plain_text_to_image_little(onnx_cn: Path, tiny_models: dict[str, Path],
                                                            tmp_path: Path, capsys) -> None:
    """One transformer call of the plain export vs the `--controlnet` export fed broadcast zero
    residuals (ONNX Runtime, one thread, interleaved); BENCHMARKS.md quotes the printed line."""
    import time

    from sd35trt.runtime.backends.ort_backend import OrtBackend
    from sd35trt.runtime.checkpoint import Checkpoint

    plain_dir = tmp_path / "plain"
    export_model(tiny_models["large"], plain_dir, ExportOptions(precision="fp32"), progress=False)
    config = Checkpoint.open(tiny_models["large"]).config
    backends = {"plain": OrtBackend(plain_dir, config, intra_op_threads=1),
                "controlnet": OrtBackend(onnx_cn, config, intra_op_threads=1)}
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 16, 64, 64, generator=g), torch.tensor([500.0, 500.0]),  # 512 px, CFG rows
            torch.randn(2, 77 + 256, 96, generator=g), torch.randn(2, 80, generator=g))
    times: dict[str, list[float]] = {k: [] for k in backends}
    outs = {k: b.transformer(*args) for k, b in backends.items()}  # warm-up
    for _ in range(8):
        for k, b in backends.items():
            t0 = time.perf_counter()
            for _ in range(5):
                b.transformer(*args)
            times[k].append((time.perf_counter() - t0) / 5)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratio = med["controlnet"] / med["plain"]
    with capsys.disabled():
        print(f"\n[transformer call at 512 px, batch 2: plain graph {med['plain'] * 1e3:.1f} ms, --controlnet graph "
              f"with zero residuals {med['controlnet'] * 1e3:.1f} ms (median of 8x5; ratio {ratio:.3f})]")
    assert torch.equal(outs["plain"], outs["controlnet"])  # zeros change nothing
    assert ratio <= 1.25  # loose: a shared 2-core CPU
