"""LoRA files for tests, written the ways people get them.

`write_peft_lora`: peft injects adapters into diffusers' SD3Transformer2DModel and transformers'
CLIP encoders (random non-zero A and B), `get_peft_model_state_dict` reads them and diffusers'
`save_lora_weights` writes the file with its adapter metadata (lora_alpha != r, so the scale is
exercised). `write_kohya_lora`: the kohya/sd-scripts layout with SAI single-file names (a fused
x_block qkv among them) and `.alpha`; it also returns the same LoRA as a diffusers state dict (alpha
/ rank folded into lora_B, q/k/v split), written out by hand here from the SAI naming, which is
what diffusers' `load_lora_weights` takes as the reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                       "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * std


def write_peft_lora(model_dir: Path, out: Path, seed: int = 0, rank: int = 4, alpha: float = 8.0,
                    std: float = 0.15) -> Path:
    """A diffusers/peft LoRA for the transformer, CLIP-L and CLIP-G of the tiny model at `model_dir`."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModelWithProjection

    parts, meta = {}, {}
    models = {"transformer": (SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer"),
                              TRANSFORMER_TARGETS),
              "text_encoder": (CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder"), CLIP_TARGETS),
              "text_encoder_2": (CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder_2"),
                                 CLIP_TARGETS)}
    for k, (model, targets) in enumerate(models.values()):
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
        inject_adapter_in_model(cfg, model, adapter_name="default")
        _randomize(model, seed * 10 + k, std)
        parts[model] = get_peft_model_state_dict(model, adapter_name="default")
        meta[model] = cfg.to_dict()
    (t, _), (c1, _), (c2, _) = models.values()
    StableDiffusion3Pipeline.save_lora_weights(
        out.parent, transformer_lora_layers=parts[t], text_encoder_lora_layers=parts[c1],
        text_encoder_2_lora_layers=parts[c2], weight_name=out.name, transformer_lora_adapter_metadata=meta[t],
        text_encoder_lora_adapter_metadata=meta[c1], text_encoder_2_lora_adapter_metadata=meta[c2])
    return out


def _pair(g: torch.Generator, out_dim: int, in_dim: int, rank: int, std: float):
    return torch.randn(rank, in_dim, generator=g) * std, torch.randn(out_dim, rank, generator=g) * std


def write_kohya_lora(model_dir: Path, out: Path, seed: int = 1, rank: int = 2, alpha: float = 1.0,
                     std: float = 0.3) -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA at `out`; returns the same LoRA as a diffusers state dict for the reference."""
    import json

    cfg = json.loads((model_dir / "transformer" / "config.json").read_text())
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    c_l = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    c_g = json.loads((model_dir / "text_encoder_2" / "config.json").read_text())
    dl, dg = c_l["hidden_size"], c_g["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    kohya: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    scale = alpha / rank
    # (kohya name, [(diffusers name, rows of up)], out, in)
    specs = [
        ("lora_unet_joint_blocks_0_x_block_attn_qkv",
         [(f"transformer.transformer_blocks.0.attn.to_{x}", i) for i, x in enumerate("qkv")], 3 * d, d),
        ("lora_unet_joint_blocks_0_context_block_attn_proj", [("transformer.transformer_blocks.0.attn.to_add_out", 0)],
         d, d),
        ("lora_unet_joint_blocks_1_x_block_mlp_fc2", [("transformer.transformer_blocks.1.ff.net.2", 0)], d, 4 * d),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
         [("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 0)], dl, dl),
        # (diffusers infers a text encoder dict's layout from an attention key: each has one)
        ("lora_te1_text_model_encoder_layers_1_self_attn_out_proj",
         [("text_encoder.text_model.encoder.layers.1.self_attn.out_proj", 0)], dl, dl),
        ("lora_te2_text_model_encoder_layers_1_mlp_fc1", [("text_encoder_2.text_model.encoder.layers.1.mlp.fc1", 0)],
         2 * dg, dg),
        ("lora_te2_text_model_encoder_layers_0_self_attn_v_proj",
         [("text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj", 0)], dg, dg),
    ]
    if cfg.get("dual_attention_layers"):
        specs.append(("lora_unet_joint_blocks_0_x_block_attn2_qkv",
                      [(f"transformer.transformer_blocks.0.attn2.to_{x}", i) for i, x in enumerate("qkv")], 3 * d, d))
    for name, targets, out_dim, in_dim in specs:
        down, up = _pair(g, out_dim, in_dim, rank, std)
        kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"] = down, up
        kohya[f"{name}.alpha"] = torch.tensor(alpha)
        rows = up.shape[0] // len(targets)
        for target, i in targets:
            ref[f"{target}.lora_A.weight"] = down.clone()
            ref[f"{target}.lora_B.weight"] = up[i * rows:(i + 1) * rows] * scale
    save_file(kohya, str(out))
    return ref
