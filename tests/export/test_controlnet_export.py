"""The ControlNet's ONNX graphs: fp32 equals torch in ONNX Runtime, FP8 (calibrated jointly with the
MMDiT) keeps the final latents (cosine >= 0.99), and TensorRT-RTX builds its sm89 engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd35trt.export.tiny_controlnet import write_tiny_controlnet
from sd35trt.runtime.backends.base import ComponentCall
from sd35trt.runtime.backends.torch_backend import ModuleRun, TorchBackend
from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.components import component
from sd35trt.runtime.control import ControlNet, ControlNets, check_control, plan
from sd35trt.runtime.models.controlnet import load_controlnet, shared_pos_embed
from sd35trt.runtime.models.loader import load_modules
from sd35trt.runtime.pipeline import sample
from sd35trt.runtime.requests import normalize_request
from sd35trt.runtime.text import PromptEncoder, load_tokenizers

ort = pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) runs the exported graphs")
pytest.importorskip("modelopt", reason="nvidia-modelopt (export extra) calibrates FP8")
from sd35trt.export.calibrate import CalibSettings, CalibState, apply_calibration  # noqa: E402
from sd35trt.export.controlnet_export import (  # noqa: E402
    build_controlnet_engine, calib_control_images, export_controlnet)
from sd35trt.runtime.backends.ort_backend import _Session  # noqa: E402

CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def nets(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cn-export")
    return {s: write_tiny_controlnet(tiny_models["large"], root / s, s, 3 if s == "large" else 2, seed=1)
            for s in ("large", "instantx")}


@pytest.fixture(scope="module")
def fp8(tiny_models: dict[str, Path], nets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cn-onnx") / "fp8"
    export_controlnet(tiny_models["large"], nets["large"], out, precision="fp8", dtype="fp32",
                      calib=CalibSettings(num_prompts=2, steps=4, height=64, width=64, seed=0))
    return out


def _session(path: Path) -> _Session:
    return _Session(path, "controlnet", ["CPUExecutionProvider"], ort.SessionOptions(), "re-export it")


@pytest.mark.parametrize("style", ["large", "instantx"])
def test_fp32_graph_equals_torch(style: str, tiny_models: dict[str, Path], nets: dict[str, Path], tmp_path: Path) -> None:
    doc = export_controlnet(tiny_models["large"], nets[style], tmp_path)
    session = _session(tmp_path / doc["file"])  # refuses inputs other than the table's
    assert [o.name for o in session.session.get_outputs()] == list(component("controlnet").output_names)
    ckpt = Checkpoint.open(tiny_models["large"])
    net = load_controlnet(nets[style], ckpt.config.transformer, lambda: shared_pos_embed(ckpt.transformer_state()), CPU, F32)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(3, 16, 8, 10, generator=g), torch.randn(3, 16, 8, 10, generator=g),  # [B, 16, h, w] x2
            torch.tensor([999.0, 500.0, 10.0]), torch.randn(3, 77 + 20, 96, generator=g), torch.randn(3, 80, generator=g))
    with torch.no_grad():
        want = net(*args)  # [R, B, N, D]
    got = session(*args)[0]
    assert got.shape == want.shape == (3 if style == "large" else 2, 3, 20, 32)
    assert float((got - want).abs().max()) <= 1e-3


def _final_latents(ckpt: Checkpoint, transformer, net_run, spec, prompt: str) -> torch.Tensor:
    mods = load_modules(ckpt, ["clip_l", "clip_g", "t5", "vae_encoder"], CPU, F32)
    backend = TorchBackend.from_modules(mods, CPU, F32)
    encode = PromptEncoder(ckpt.config, load_tokenizers(ckpt), backend)
    nets = ControlNets((ControlNet(Path("cn"), spec, net_run),), False)
    req = normalize_request(ckpt.config, prompt, negative_prompt="blurry", height=64, width=64,
                            num_inference_steps=6, guidance_scale=4.5)
    image = calib_control_images(1, 64, 64, seed=11)[0]
    creq = check_control(nets, image, 1.0, 0.0, 1.0, 64, 64, 1, 1, torch.Generator().manual_seed(3))
    control = plan(nets, creq, backend.vae_encoder, ckpt.config.vae, req, CPU)
    return sample(encode, transformer, CPU, req, generator=torch.Generator().manual_seed(7),
                  vae_encoder=backend.vae_encoder, control=control)


def test_fp8_joint_calibration_keeps_the_final_latents(fp8: Path, tiny_models: dict[str, Path], nets: dict[str, Path],
                                                      capsys) -> None:
    ckpt = Checkpoint.open(tiny_models["large"])
    cn_amax = CalibState.load(fp8 / "controlnet_calibration").amax
    assert any(k.startswith("controlnet_blocks.") for k in cn_amax) and any(".attn.to_q." in k for k in cn_amax)
    assert not any(k.startswith("pos_embed") or k.startswith("time_text_embed") for k in cn_amax)
    mmdit = load_modules(ckpt, ["transformer"], CPU, F32)["transformer"]
    net = load_controlnet(nets["large"], ckpt.config.transformer, lambda: shared_pos_embed(ckpt.transformer_state()), CPU, F32)
    ref_run = ModuleRun(net, F32)
    ref = _final_latents(ckpt, ComponentCall(ModuleRun(mmdit, F32), "transformer"), lambda *a: ref_run(*a)[0],
                         net.spec, "a lighthouse on a cliff at dusk")
    quant = apply_calibration(load_modules(ckpt, ["transformer"], CPU, F32)["transformer"],
                              CalibState.load(fp8 / "calibration"))
    session = _session(fp8 / "controlnet.onnx")  # the FP8 graph (Q/DQ), in ONNX Runtime
    got = _final_latents(ckpt, ComponentCall(ModuleRun(quant, F32), "transformer"), lambda *a: session(*a)[0],
                         net.spec, "a lighthouse on a cliff at dusk")
    cos = float(torch.nn.functional.cosine_similarity(got.flatten().double(), ref.flatten().double(), dim=0))
    with capsys.disabled():
        print(f"\n[controlnet fp8 (joint calibration) vs fp32 final-latent cosine: {cos:.5f}]")
    assert cos >= 0.99
    assert not torch.equal(got, ref)  # FP8 is really in the path


def test_trt_rtx_builds_the_controlnet_engine_for_sm89(fp8: Path, tiny_models: dict[str, Path]) -> None:
    pytest.importorskip("tensorrt_rtx_bindings", reason="pip install 'sd35trt[trt-rtx]' builds engines on the CPU")
    config = Checkpoint.open(tiny_models["large"]).config
    report = build_controlnet_engine(fp8 / "controlnet.onnx", fp8 / "controlnet.sm89.engine", config, "sm89", size=64)
    assert report.engine_bytes > 0 and (fp8 / "controlnet.sm89.engine").is_file()
    assert [t.name for t in report.inputs] == list(component("controlnet").input_names)
    assert report.compute_capability == "sm89"


def test_torch_fp8_runs_the_controlnet_with_fp8_gemms(fp8: Path, tiny_models: dict[str, Path], nets: dict[str, Path],
                                                     capsys) -> None:
    from sd35trt.runtime import Pipeline

    image = calib_control_images(1, 64, 64, seed=12)[0]
    kw = dict(prompt="a lighthouse", negative_prompt="blurry", height=64, width=64, num_inference_steps=4,
              guidance_scale=4.5, output_type="latent", progress=False, control_image=image)

    def latents(pipe: Pipeline) -> torch.Tensor:
        return pipe(**kw, generator=torch.Generator().manual_seed(2),
                    control_generator=torch.Generator().manual_seed(2)).images.flatten().double()

    with Pipeline.from_pretrained(tiny_models["large"], backend="torch-fp8", device="cpu",
                                  calibration=fp8 / "calibration", controlnet=nets["large"]) as pipe:
        assert pipe.backend.controlnet_fp8_layers > 0  # q/k/v fused: fewer than the graph's 24
        got = latents(pipe)
    with Pipeline.from_pretrained(tiny_models["large"], backend="torch", device="cpu", dtype=torch.float32,
                                  controlnet=nets["large"]) as ref_pipe:
        ref = latents(ref_pipe)
    cos = float(torch.nn.functional.cosine_similarity(got, ref, dim=0))
    with capsys.disabled():
        print(f"\n[torch-fp8 with an FP8 ControlNet vs fp32 final-latent cosine: {cos:.5f}]")
    assert cos >= 0.99 and not torch.equal(got, ref)
