"""SD3.5 architecture read from tensor shapes: what a single-file checkpoint (Stability AI / ComfyUI
names) holds, never guessed from a file name. What shapes cannot tell comes from `hints` (our tiny
files' `sd35trt.config` metadata) or else from the released SD3.5 conventions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .config import TransformerSpec, VaeSpec
from .errors import CheckpointError

CLIP_ACT = {"clip_l": "quick_gelu", "clip_g": "gelu"}  # heads: width / 64 (12 and 20)
CLIP_HINTS = ("num_attention_heads", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")
T5_HINTS = ("feed_forward_proj", "relative_attention_max_distance", "layer_norm_epsilon", "pad_token_id", "eos_token_id")


def _shape(shapes: dict[str, tuple[int, ...]], key: str, source: Path | str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{source}: tensor {key!r} is missing; the file is incomplete or not SD3.5")
    return shapes[key]


def _count(shapes: dict, prefix: str, at: int, source: Path | str) -> int:
    """Number of numbered blocks `prefix.N.*` (N at dot-position `at`); they must be 0..n-1."""
    found = {int(k.split(".")[at]) for k in shapes if k.startswith(prefix)}
    if not found or found != set(range(len(found))):
        raise CheckpointError(f"{source}: blocks {prefix}N are missing or not numbered 0..n-1 ({sorted(found)[:8]})")
    return len(found)


def transformer_spec(shapes: dict[str, tuple[int, ...]], hints: dict, source: Path | str = "") -> TransformerSpec:
    """MMDiT architecture from SAI tensor shapes (names without `model.diffusion_model.`)."""
    d, c_in, p, _ = _shape(shapes, "x_embedder.proj.weight", source)  # [D, 16, p, p]
    n_pos = _shape(shapes, "pos_embed", source)[1]  # [1, m*m, D]
    cap, joint = _shape(shapes, "context_embedder.weight", source)  # [D, 4096]
    m = math.isqrt(n_pos)
    if m * m != n_pos:
        raise CheckpointError(f"{source}: pos_embed has {n_pos} positions, not a square grid; not SD3.5")
    ln_q = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")  # [head_dim] with QK-norm
    head_dim = ln_q[0] if ln_q else int(hints.get("attention_head_dim", 64))
    return TransformerSpec(
        num_layers=_count(shapes, "joint_blocks.", 1, source),
        num_attention_heads=d // head_dim,
        attention_head_dim=head_dim,
        caption_projection_dim=cap,
        pos_embed_max_size=m,
        sample_size=int(hints.get("sample_size", 128)),
        joint_attention_dim=joint,
        pooled_projection_dim=_shape(shapes, "y_embedder.mlp.0.weight", source)[1],
        patch_size=p,
        in_channels=c_in,
        out_channels=_shape(shapes, "final_layer.linear.weight", source)[0] // (p * p),
        qk_norm="rms_norm" if ln_q else None,
        dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in shapes if ".x_block.attn2." in k})),
    )


def vae_spec(shapes: dict[str, tuple[int, ...]], hints: dict, source: Path | str = "") -> VaeSpec:
    """VAE architecture from LDM decoder shapes (names without `first_stage_model.`)."""
    levels = _count(shapes, "decoder.up.", 2, source)
    chans = tuple(_shape(shapes, f"decoder.up.{i}.block.0.conv2.weight", source)[0] for i in range(levels))
    return VaeSpec(
        block_out_channels=chans,
        layers_per_block=_count(shapes, "decoder.up.0.block.", 4, source) - 1,
        norm_num_groups=int(hints.get("norm_num_groups", 32)),
        latent_channels=_shape(shapes, "decoder.conv_in.weight", source)[1],
        scaling_factor=float(hints.get("scaling_factor", 1.5305)),
        shift_factor=float(hints.get("shift_factor", 0.0609)),
    )


def text_config(name: str, shapes: dict[str, tuple[int, ...]], hints: dict, source: Path | str = "") -> Any:
    """transformers CLIPTextConfig / T5Config from a text-encoder file's shapes."""
    from transformers import CLIPTextConfig, T5Config

    if name == "t5":
        emb = "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"
        att, ff = "encoder.block.0.layer.0.SelfAttention.", "encoder.block.0.layer.1.DenseReluDense."
        buckets, heads = _shape(shapes, att + "relative_attention_bias.weight", source)
        gated = ff + "wi_0.weight" in shapes
        cfg = dict(
            vocab_size=shapes[emb][0], d_model=shapes[emb][1], num_layers=_count(shapes, "encoder.block.", 2, source),
            num_heads=heads, d_kv=_shape(shapes, att + "q.weight", source)[0] // heads,
            d_ff=_shape(shapes, ff + ("wi_0.weight" if gated else "wi.weight"), source)[0],
            relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu" if gated else "relu", layer_norm_epsilon=1e-6,
            is_encoder_decoder=False, use_cache=False,
        )
        return T5Config(**{**cfg, **{k: hints[k] for k in T5_HINTS if k in hints}})
    vocab, hidden = _shape(shapes, "text_model.embeddings.token_embedding.weight", source)
    cfg = dict(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=hidden // 64, hidden_act=CLIP_ACT[name],
        intermediate_size=_shape(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", source)[0],
        num_hidden_layers=_count(shapes, "text_model.encoder.layers.", 3, source),
        max_position_embeddings=_shape(shapes, "text_model.embeddings.position_embedding.weight", source)[0],
        projection_dim=_shape(shapes, "text_projection.weight", source)[0],
    )
    return CLIPTextConfig(**{**cfg, **{k: hints[k] for k in CLIP_HINTS if k in hints}})
