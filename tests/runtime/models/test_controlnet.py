"""Our SD3ControlNet equals diffusers' SD3ControlNetModel; our MMDiT adds residuals as diffusers'
SD3Transformer2DModel(block_controlnet_hidden_states=...) does (fp32, CPU, strict loads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd35trt.export.tiny_controlnet import write_tiny_controlnet
from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.errors import CheckpointError
from sd35trt.runtime.models.controlnet import ControlNetSpec, load_controlnet, residual_sum, shared_pos_embed
from sd35trt.runtime.models.loader import load_modules

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) is the reference")
CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def large(tiny_models: dict[str, Path]):
    ckpt = Checkpoint.open(tiny_models["large"])
    ours = load_modules(ckpt, ["transformer"], CPU, F32)["transformer"]
    ref = diffusers.SD3Transformer2DModel.from_pretrained(tiny_models["large"] / "transformer")
    return ckpt, ours, ref


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, 12, generator=g)  # [B, 16, h, w]
    cond = torch.randn(2, 16, 8, 12, generator=g)  # [B, 16, h, w]
    t = torch.tensor([900.0, 300.0])  # [B]
    ctx = torch.randn(2, 77 + 16, 96, generator=g)  # [B, 77+T, 96] (tiny T5 width)
    pooled = torch.randn(2, 80, generator=g)  # [B, 32+48]
    return x, cond, t, ctx, pooled


@pytest.mark.parametrize("style,layers", [("large", 3), ("large", 2), ("instantx", 2)])
def test_controlnet_and_residuals_equal_diffusers(style: str, layers: int, large, tmp_path: Path) -> None:
    ckpt, mmdit, ref_mmdit = large
    folder = write_tiny_controlnet(ckpt.path, tmp_path / "cn", style, layers, seed=1)
    ref = diffusers.SD3ControlNetModel.from_pretrained(folder)
    if not ref.config.use_pos_embed:  # as StableDiffusion3ControlNetPipeline does
        ref.pos_embed = ref._get_pos_embed_from_transformer(ref_mmdit)
    ours = load_controlnet(folder, ckpt.config.transformer, lambda: shared_pos_embed(ckpt.transformer_state()), CPU, F32)
    x, cond, t, ctx, pooled = _inputs()
    with torch.no_grad():
        want = ref(hidden_states=x, controlnet_cond=cond, conditioning_scale=0.7, timestep=t, pooled_projections=pooled,
                   encoder_hidden_states=ctx if style == "instantx" else None, return_dict=False)[0]
        got = ours(x, cond, t, ctx, pooled) * 0.7  # [R, B, N, D]
        v_want = ref_mmdit(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled,
                           block_controlnet_hidden_states=want, return_dict=False)[0]
        v_got = mmdit(x, t, ctx, pooled, controlnet_residuals=got)
        v_plain = mmdit(x, t, ctx, pooled)
    assert got.shape == (layers, 2, 24, 32)
    assert max(float((a - b).abs().max()) for a, b in zip(want, got)) <= 1e-5
    assert float((v_got - v_want).abs().max()) <= 1e-5
    assert float((v_got - v_plain).abs().max()) > 1e-2  # the residuals matter


def test_multi_controlnet_sum_zips_as_diffusers() -> None:
    a, b = torch.randn(3, 1, 4, 8), torch.randn(2, 1, 4, 8)  # [R, B, N, D]
    total = residual_sum([a, b])
    assert total.shape == (2, 1, 4, 8)
    assert torch.equal(total, a[:2] + b)


def test_config_defaults_and_refusals(tmp_path: Path, large) -> None:
    spec = ControlNetSpec.from_config({"num_layers": 2})
    assert spec.force_zeros_for_pooled_projection and spec.use_pos_embed and spec.joint_attention_dim == 4096
    with pytest.raises(CheckpointError, match="pos_embed_max_size=None"):
        ControlNetSpec.from_config({"pos_embed_max_size": None})
    ckpt = large[0]
    folder = write_tiny_controlnet(ckpt.path, tmp_path / "cn", "large", 1, seed=0)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 4}))
    with pytest.raises(CheckpointError, match="does not fit the model's transformer"):
        load_controlnet(folder, ckpt.config.transformer, dict, CPU, F32)
    (folder / "config.json").write_text(json.dumps({**cfg, "_class_name": "ControlNetModel"}))
    with pytest.raises(CheckpointError, match="not an SD3ControlNetModel"):
        load_controlnet(folder, ckpt.config.transformer, dict, CPU, F32)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_controlnet(folder, ckpt.config.transformer, dict, CPU, F32)
