"""Stability's single-file ControlNet names load into our SD3ControlNet and give the same residuals
as the diffusers folder they were written from (the file is made here, name by name)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35trt.export.tiny_controlnet import write_tiny_controlnet
from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.errors import CheckpointError
from sd35trt.runtime.models.controlnet import load_controlnet, shared_pos_embed
from sd35trt.runtime.models.controlnet_file import load_any, load_single_file

pytest.importorskip("diffusers", reason="diffusers (test extra) writes the tiny ControlNet")
CPU, F32 = torch.device("cpu"), torch.float32


def _to_stability(state: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The sd3.5 repo's ControlNetEmbedder names of a diffusers SD3.5 Large style ControlNet."""
    out = {"control_type": torch.tensor([1], dtype=torch.int32),  # canny
           "x_embedder.proj.weight": torch.zeros(32, 16, 2, 2), "x_embedder.proj.bias": torch.zeros(32)}
    for p in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{p}"] = state[f"time_text_embed.timestep_embedder.linear_1.{p}"]
        out[f"t_embedder.mlp.2.{p}"] = state[f"time_text_embed.timestep_embedder.linear_2.{p}"]
        out[f"y_embedder.mlp.0.{p}"] = state[f"time_text_embed.text_embedder.linear_1.{p}"]
        out[f"y_embedder.mlp.2.{p}"] = state[f"time_text_embed.text_embedder.linear_2.{p}"]
        out[f"pos_embed_input.proj.{p}"] = state[f"pos_embed_input.proj.{p}"]
        for i in range(n):
            b = f"transformer_blocks.{i}."
            out[f"controlnet_blocks.{i}.{p}"] = state[f"controlnet_blocks.{i}.{p}"]
            out[b + f"adaLN_modulation.1.{p}"] = state[b + f"norm1.linear.{p}"]
            out[b + f"attn.qkv.{p}"] = torch.cat([state[b + f"attn.to_{x}.{p}"] for x in "qkv"])
            out[b + f"attn.proj.{p}"] = state[b + f"attn.to_out.0.{p}"]
            out[b + f"mlp.fc1.{p}"] = state[b + f"ff.net.0.proj.{p}"]
            out[b + f"mlp.fc2.{p}"] = state[b + f"ff.net.2.{p}"]
    return out


def test_stability_single_file_equals_the_diffusers_folder(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    ckpt = Checkpoint.open(tiny_models["large"])
    folder = write_tiny_controlnet(ckpt.path, tmp_path / "cn", "large", 3, seed=6)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    sai = tmp_path / "sd3.5_large_controlnet_canny.safetensors"
    save_file({k: v.contiguous() for k, v in _to_stability(state, 3).items()}, str(sai))
    pos = lambda: shared_pos_embed(ckpt.transformer_state())  # noqa: E731
    want_net = load_controlnet(folder, ckpt.config.transformer, pos, CPU, F32)
    got_net, kind = load_single_file(sai, ckpt.config.transformer, pos, CPU, F32)
    assert kind == "canny" and got_net.spec == want_net.spec
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g), torch.tensor([900.0, 100.0]),
            torch.randn(2, 93, 96, generator=g), torch.randn(2, 80, generator=g))
    with torch.no_grad():
        assert torch.equal(got_net(*args), want_net(*args))
    assert load_any(sai, ckpt.config.transformer, pos, CPU, F32).spec.num_layers == 3  # by path too
    bad = tmp_path / "bad.safetensors"
    save_file({"controlnet_blocks.0.weight": torch.zeros(8, 8)}, str(bad))
    with pytest.raises(CheckpointError, match="pos_embed_input.proj.weight"):
        load_single_file(bad, ckpt.config.transformer, pos, CPU, F32)
    extra = tmp_path / "extra.safetensors"
    save_file({**{k: v.contiguous() for k, v in _to_stability(state, 3).items()}, "unicorn.weight": torch.zeros(2)},
              str(extra))
    with pytest.raises(CheckpointError, match="unicorn"):
        load_single_file(extra, ckpt.config.transformer, pos, CPU, F32)
