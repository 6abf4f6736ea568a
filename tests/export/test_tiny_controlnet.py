"""Tiny ControlNets: diffusers layout, every tensor non-zero, same seed -> same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd35trt.export.tiny_controlnet import write_tiny_controlnet
from sd35trt.runtime import InvalidInputError

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) writes the diffusers layout")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("style", ["large", "instantx"])
def test_tiny_controlnet_is_deterministic_and_trained_looking(style: str, tiny_models: dict[str, Path],
                                                              tmp_path: Path) -> None:
    a = write_tiny_controlnet(tiny_models["large"], tmp_path / "a", style, 2, seed=4)
    b = write_tiny_controlnet(tiny_models["large"], tmp_path / "b", style, 2, seed=4)
    c = write_tiny_controlnet(tiny_models["large"], tmp_path / "c", style, 2, seed=5)
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)
    state = load_file(a / "diffusion_pytorch_model.safetensors")
    zeros = [k for k, t in state.items() if not bool(t.any())]
    assert zeros == []
    assert any(k.startswith("controlnet_blocks.") for k in state) and "pos_embed_input.proj.weight" in state
    model = diffusers.SD3ControlNetModel.from_pretrained(a)  # loads strictly in diffusers
    assert model.config.num_layers == 2
    assert (model.config.joint_attention_dim is None) == (style == "large")
    assert model.config.use_pos_embed == (style == "instantx")
    assert model.config.force_zeros_for_pooled_projection == (style == "instantx")
    assert torch.equal(model.controlnet_blocks[0].weight.data, state["controlnet_blocks.0.weight"])


def test_tiny_controlnet_refuses_bad_arguments(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="style='depth'"):
        write_tiny_controlnet(tiny_models["large"], tmp_path / "x", "depth")
    with pytest.raises(InvalidInputError, match="transformer/config.json"):
        write_tiny_controlnet(tmp_path, tmp_path / "y")
    with pytest.raises(InvalidInputError, match="num_layers=0"):
        write_tiny_controlnet(tiny_models["large"], tmp_path / "z", num_layers=0)
