"""`torch-fp8` backend: real FP8 GEMMs (torch._scaled_mm) from the export's ModelOpt calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd35trt.runtime import CheckpointError, Pipeline
from sd35trt.runtime.models.fp8 import FP8Linear

KW = dict(prompt="an orange cat on a windowsill", negative_prompt="blurry", height=64, width=64,
          num_inference_steps=6, guidance_scale=4.5, output_type="latent")


def _latent(pipe: Pipeline) -> torch.Tensor:
    return pipe(**KW, generator=torch.Generator().manual_seed(4), progress=False).images.flatten().double()


def test_fp8_backend_close_to_fp32_and_to_the_fp8_graph(tiny_medium: Path, onnx_fp8: Path, capsys) -> None:
    fp8 = Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration=onnx_fp8 / "calibration")
    linears = [m for m in fp8.backend.transformer.model.modules() if isinstance(m, torch.nn.Linear)]
    assert fp8.backend.fp8_layers > 0 and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(m.weight_t.dtype == torch.float8_e4m3fn for m in fp8.backend.transformer.model.modules()
               if isinstance(m, FP8Linear))
    ours = _latent(fp8)
    ref = _latent(Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32))
    graph = _latent(Pipeline.from_pretrained(onnx_fp8, backend="onnxruntime"))
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    with capsys.disabled():
        print(f"\n[torch-fp8 final latent cosine: vs fp32 {cos(ours, ref):.5f}, vs FP8 ONNX {cos(ours, graph):.5f}]")
    assert 1 - cos(ours, ref) <= 2e-3  # seen 0.99991 (1 - cos = 9e-5)
    assert 1 - cos(ours, graph) <= 1e-3  # seen 0.99993 (7e-5)
    assert not torch.equal(ours, ref)


def test_calibration_is_required_and_must_match(tiny_models: dict[str, Path], onnx_fp8: Path) -> None:
    with pytest.raises(CheckpointError, match="calibration="):
        Pipeline.from_pretrained(tiny_models["medium"], backend="torch-fp8", device="cpu")
    # the large tiny model has no attn2 layers: the medium calibration names layers it lacks
    with pytest.raises(CheckpointError, match="does not match"):
        Pipeline.from_pretrained(tiny_models["large"], backend="torch-fp8", device="cpu",
                                 calibration=onnx_fp8 / "calibration")


@pytest.mark.parametrize("bad", ["max-autotune", 1, None])
def test_bad_compile_value_is_refused_before_loading(tiny_medium: Path, bad) -> None:
    from sd35trt.runtime import InvalidInputError

    with pytest.raises(InvalidInputError, match="compile="):
        Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration="/nonexistent",
                                 compile=bad)


def test_fp8_backend_runs_the_image_modes_in_bf16_on_the_cpu(tiny_medium: Path, onnx_fp8: Path) -> None:
    """The bf16 VAE encoder (eager on the CPU) and SLG: final latents close to the fp32 torch backend."""
    import numpy as np

    fp8 = Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration=onnx_fp8 / "calibration")
    ref = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)
    encoder = fp8.backend.modules["vae_encoder"]
    assert next(encoder.parameters()).dtype == torch.bfloat16 and not hasattr(encoder, "_orig_mod")
    g = np.random.default_rng(0)
    pic = g.uniform(0.2, 0.8, (64, 64, 3)).astype(np.float32)  # [H, W, 3]
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 8:40] = 1.0
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    for extra in (dict(image=pic, mask_image=mask, strength=0.8),  # the encoder, the blend
                  dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)):
        kw = {**KW, **extra, "num_inference_steps": 3, "max_sequence_length": 16}  # kept short: FP8 on a CPU is slow
        a = fp8(**kw, generator=torch.Generator().manual_seed(4), progress=False).images.flatten().double()
        b = ref(**kw, generator=torch.Generator().manual_seed(4), progress=False).images.flatten().double()
        assert cos(a, b) >= 0.99, (sorted(extra), cos(a, b))


def test_t5_runs_fp8_gemms_with_the_exports_t5_calibration_else_weight_only(tiny_medium: Path, onnx_fp8: Path,
                                                                           tmp_path: Path, capsys) -> None:
    """The FP8 export writes T5's calibration beside the MMDiT's; the backend then runs T5's GEMMs
    in FP8 (context vs the fp32 torch backend's: measured 0.99735, weight-only 0.99882, on the tiny
    T5 of width 96; bound 1 - cos <= 5e-3);
    without the file T5 is weight-only FP8 as before; a stale file is refused (CheckpointError)."""
    import shutil

    from sd35trt.runtime.models.fp8 import FP8WeightLinear
    from sd35trt.runtime.models.fp8_text import T5_AMAX, FP8TextLinear, load_t5_amax, save_t5_amax

    calib = onnx_fp8 / "calibration"
    amax, meta = load_t5_amax(calib)
    assert meta["num_prompts"] == "3" and meta["fingerprint"] and meta["dtype"] == "fp32"

    def context(pipe: Pipeline) -> torch.Tensor:
        return pipe.encode(["a red fox in the snow"], ["a red fox in the snow"], ["a red fox in the snow"], 256)[0]

    fp8 = Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration=calib)
    kinds = {type(m) for m in fp8.backend.modules["t5"].modules()}
    assert fp8.backend.t5_precision == "fp8-gemms" and {FP8TextLinear, FP8WeightLinear} <= kinds
    bare = tmp_path / "calibration"
    shutil.copytree(calib, bare, ignore=shutil.ignore_patterns(T5_AMAX))
    wo = Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration=bare)
    assert wo.backend.t5_precision == "fp8-weights"
    assert not any(isinstance(m, FP8TextLinear) for m in wo.backend.modules["t5"].modules())
    ref = context(Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)).double()
    cos = {k: float(torch.nn.functional.cosine_similarity(context(p).double().flatten(), ref.flatten(), dim=0))
           for k, p in (("fp8-gemms", fp8), ("fp8-weights", wo))}
    with capsys.disabled():
        print(f"\n[torch-fp8 context cosine vs fp32: {cos}]")
    assert all(1 - c <= 5e-3 for c in cos.values())
    stale = dict(amax)
    stale[next(k for k in stale if k.endswith("wi_0.weight_quantizer"))] *= 3
    save_t5_amax(stale, bare)
    with pytest.raises(CheckpointError, match=f"{T5_AMAX} was calibrated on other T5 weights"):
        Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration=bare)


def test_compile_compiles_the_text_encoders_but_t5_stays_eager_when_it_streams(tiny_medium: Path,
                                                                              onnx_fp8: Path) -> None:
    """compile=True wraps the CLIPs and T5 (lazily: nothing compiles until a call); in memory modes
    (weights loaded on the host, T5 streamed by per-block hooks in 'low') T5 stays eager."""
    kw = dict(backend="torch-fp8", device="cpu", calibration=onnx_fp8 / "calibration", compile=True)
    whole = Pipeline.from_pretrained(tiny_medium, **kw).backend
    assert whole.compiled_text == ["clip_l", "clip_g", "t5"]
    low = Pipeline.from_pretrained(tiny_medium, memory="low", **kw).backend
    assert low.compiled_text == ["clip_l", "clip_g"] and low.t5_precision == "fp8-gemms"
    assert getattr(low.modules["t5"], "_compiled_call_impl", None) is None
    assert getattr(low.modules["clip_g"], "_compiled_call_impl", None) is not None
    assert Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu",
                                    calibration=onnx_fp8 / "calibration").backend.compiled_text == []
