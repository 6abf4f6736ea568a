"""The ControlNet step bench's CPU side: the released ControlNet's shape, the peer computing the same
function as ours (fp32, tiny), and a smoke run of the whole bench path (FP8, tiny, CPU)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sd35trt.bench import diffusers_peer, random_mmdit, step_inputs
from sd35trt.bench_control import (RELEASED_LARGE, ControlStep, bench_control, control_latents, control_spec,
                                   diffusers_controlnet, peer_step, random_controlnet)
from sd35trt.export.tiny_model import TINY_TRANSFORMERS
from sd35trt.runtime.config import VARIANTS, VariantConfig

# Like Large's 38 : 19, two MMDiT blocks per ControlNet residual.
TINY = VariantConfig("tiny", "large", replace(TINY_TRANSFORMERS["large"], num_layers=4))


def test_released_large_controlnet_shape() -> None:
    spec = control_spec(VARIANTS["sd3.5-large"])
    assert spec.inner_dim == VARIANTS["sd3.5-large"].transformer.inner_dim == 2432
    assert (spec.num_layers, spec.joint_attention_dim, spec.use_pos_embed, spec.force_zeros_for_pooled_projection) == (
        RELEASED_LARGE["num_layers"], None, False, False)
    with torch.device("meta"):
        from sd35trt.runtime.models.controlnet import SD3ControlNet

        net = SD3ControlNet(spec, VARIANTS["sd3.5-large"].transformer)
    own = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("pos_embed."))
    assert 2.0e9 < own < 2.3e9  # the released files hold ~2.1 B parameters (bf16 ~4.2 GB)
    tiny = control_spec(TINY)
    assert tiny.num_layers == 2 and tiny.inner_dim == TINY.transformer.inner_dim and not tiny.use_pos_embed


def test_peer_computes_our_step() -> None:
    """diffusers' transformer + ControlNet holding our tensors == our ControlStep (fp32, CPU), and the
    residuals matter (the step without them differs)."""
    model = random_mmdit(TINY, torch.float32, "cpu")
    net = random_controlnet(control_spec(TINY), model, "cpu", dtype=torch.float32)
    args = step_inputs(TINY, 128, 1, "cpu", torch.float32)  # latents [2, 16, 16, 16]
    cond = control_latents(TINY, 128, 1, "cpu", torch.float32)  # [2, 16, 16, 16]
    with torch.no_grad():
        ours = ControlStep(model, net, 0.7)(*args, cond)
        want = peer_step(diffusers_peer(model, TINY), diffusers_controlnet(net), args, cond, 0.7)
        plain = model(*args)
    assert ours.shape == want.shape == args[0].shape
    assert (ours - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    assert (ours - plain).abs().max().item() > 1e-2


def test_bench_control_smoke_on_cpu(tmp_path: Path) -> None:
    """The bench's own path end to end (peer rows, joint calibration, FP8 step, summary JSON), eager FP8."""
    out = tmp_path / "control.json"
    s = bench_control(TINY, 128, 1, out, config="fp8+fast+gelu", attention="default", device="cpu", warmup=0, iters=1)
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["rows"]][0].startswith("diffusers eager bf16")
    assert doc["summary"] == s and s["ratio"] > 0 and s["fp8_layers_controlnet"] > 0
    assert 0.98 <= s["step_cos"] < 1.0  # FP8 vs bf16: close, not equal
    with pytest.raises(ValueError, match="fp8-turbo"):
        bench_control(TINY, 128, 1, out, config="fp8-turbo", device="cpu")


def test_cli_refuses_a_bad_control_config_before_any_work(tmp_path: Path, capsys) -> None:
    from sd35trt.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--configs", "control:fp8-turbo", "--json", str(out)]) == 1
    assert "fp8-turbo" in capsys.readouterr().err and not out.with_name("bench_control.json").exists()
