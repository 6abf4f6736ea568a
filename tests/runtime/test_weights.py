"""The Stability AI <-> diffusers name table: its reshapes, both directions, and strictness."""

from __future__ import annotations

import pytest
import torch

from sd35trt.runtime import CheckpointError
from sd35trt.runtime.weights import MMDIT_SAI_NAMES, VAE_SAI_NAMES, rename_state


def test_fused_qkv_splits_and_joins() -> None:
    qkv = torch.arange(12.0).reshape(6, 2)  # [3*D, D] with D = 2
    out = rename_state({"joint_blocks.0.context_block.attn.qkv.weight": qkv}, MMDIT_SAI_NAMES, "diffusers", "f", last=3)
    assert sorted(out) == [f"transformer_blocks.0.attn.add_{x}_proj.weight" for x in "kqv"]
    assert torch.equal(out["transformer_blocks.0.attn.add_k_proj.weight"], qkv[2:4])
    back = rename_state(out, MMDIT_SAI_NAMES, "sai", "f", last=3)
    assert torch.equal(back["joint_blocks.0.context_block.attn.qkv.weight"], qkv)


def test_final_and_pre_only_adaln_swap_shift_and_scale() -> None:
    shift_scale = torch.tensor([1.0, 1.0, 2.0, 2.0])  # SAI order: shift, scale
    sai = {"final_layer.adaLN_modulation.1.bias": shift_scale,
           "joint_blocks.3.context_block.adaLN_modulation.1.bias": shift_scale,  # last block (pre-only)
           "joint_blocks.2.context_block.adaLN_modulation.1.bias": shift_scale}  # a full block: unchanged
    out = rename_state(sai, MMDIT_SAI_NAMES, "diffusers", "f", last=3)
    scale_shift = torch.tensor([2.0, 2.0, 1.0, 1.0])
    assert torch.equal(out["norm_out.linear.bias"], scale_shift)
    assert torch.equal(out["transformer_blocks.3.norm1_context.linear.bias"], scale_shift)
    assert torch.equal(out["transformer_blocks.2.norm1_context.linear.bias"], shift_scale)
    back = rename_state(out, MMDIT_SAI_NAMES, "sai", "f", last=3)
    assert all(torch.equal(back[k], sai[k]) for k in sai)


def test_ldm_decoder_levels_run_the_other_way_and_attention_is_1x1_conv() -> None:
    w = torch.randn(8, 8, 1, 1)
    ldm = {"decoder.up.0.block.1.conv1.weight": torch.zeros(1), "decoder.up.3.upsample.conv.bias": torch.ones(1),
           "decoder.mid.attn_1.q.weight": w, "encoder.down.0.block.0.nin_shortcut.weight": torch.ones(2)}
    out = rename_state(ldm, VAE_SAI_NAMES, "diffusers", "f", n_up=4)
    assert sorted(out) == ["decoder.mid_block.attentions.0.to_q.weight", "decoder.up_blocks.0.upsamplers.0.conv.bias",
                           "decoder.up_blocks.3.resnets.1.conv1.weight", "encoder.down_blocks.0.resnets.0.conv_shortcut.weight"]
    assert out["decoder.mid_block.attentions.0.to_q.weight"].shape == (8, 8)
    back = rename_state(out, VAE_SAI_NAMES, "sai", "f", n_up=4)
    assert sorted(back) == sorted(ldm) and torch.equal(back["decoder.mid.attn_1.q.weight"], w)


def test_unknown_or_incomplete_names_raise_naming_the_source() -> None:
    with pytest.raises(CheckpointError, match=r"my\.safetensors: 1 tensor name.*lora_up"):
        rename_state({"joint_blocks.0.x_block.attn.lora_up.weight": torch.zeros(1)}, MMDIT_SAI_NAMES,
                     "diffusers", "my.safetensors", last=0)
    q_only = {"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}  # k, v missing: no fused qkv
    with pytest.raises(CheckpointError, match="to_q.weight"):
        rename_state(q_only, MMDIT_SAI_NAMES, "sai", "folder", last=0)
