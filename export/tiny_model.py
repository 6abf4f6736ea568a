"""Tiny, structurally faithful SD3.5 checkpoints in diffusers layout, generated deterministically.

No SD3.5 weights can be downloaded here, so tests and the demo run on checkpoints this module
writes: random weights (seeded), real module types (diffusers SD3Transformer2DModel and
AutoencoderKL, transformers CLIPTextModelWithProjection x2 and T5EncoderModel) and real-format
tokenizers trained on `calib_prompts/`. Same seed -> byte-identical files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from ..runtime.config import VARIANT_HINT_KEY, TransformerSpec, VaeSpec
from ..runtime.errors import InvalidInputError
from .tiny_tokenizers import build_clip_tokenizer, build_t5_tokenizer, tokenizer_vocab_size

TINY_FAMILIES = ("medium", "large", "large-turbo")
CLIP_L_DIM, CLIP_G_DIM, T5_DIM = 32, 48, 96  # real: 768, 1280, 4096
_TINY_LARGE = TransformerSpec(
    num_layers=3, num_attention_heads=2, attention_head_dim=16, caption_projection_dim=32,
    pos_embed_max_size=32, sample_size=16, joint_attention_dim=T5_DIM,
    pooled_projection_dim=CLIP_L_DIM + CLIP_G_DIM,
)
TINY_TRANSFORMERS = {
    "large": _TINY_LARGE,
    "large-turbo": _TINY_LARGE,
    # MMDiT-X like SD3.5 Medium: dual attention in the first blocks (real: 13 of 24).
    "medium": replace(_TINY_LARGE, num_layers=4, dual_attention_layers=(0, 1)),
}
TINY_VAE = VaeSpec(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "calib_prompts" / "prompts.txt"


def _clip(vocab: int, dim: int, act: str, tok_dir: Path):
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, projection_dim=dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModelWithProjection(cfg)


def _t5(vocab: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab, d_model=T5_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        use_cache=False, pad_token_id=0, eos_token_id=1,
    )
    return T5EncoderModel(cfg)


def autoencoder(spec: VaeSpec = TINY_VAE):
    """A diffusers AutoencoderKL with SD3's layout (encoder + decoder) for `spec`."""
    from diffusers import AutoencoderKL

    n = len(spec.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=spec.latent_channels,
        block_out_channels=spec.block_out_channels, layers_per_block=spec.layers_per_block,
        norm_num_groups=spec.norm_num_groups, down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=spec.scaling_factor, shift_factor=spec.shift_factor, sample_size=128,
    )


def read_corpus(path: Path = DEFAULT_CORPUS) -> list[str]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln]


def _build(tmp: Path, family: str, seed: int, corpus: list[str]) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    toks = tmp / "_tok"
    build_clip_tokenizer(corpus, toks / "tokenizer")
    build_clip_tokenizer(corpus, toks / "tokenizer_2", pad_token="!")  # as SD3's CLIP-G tokenizer
    build_t5_tokenizer(corpus, toks / "tokenizer_3")
    spec = TINY_TRANSFORMERS[family]
    cfg = {k: v for k, v in spec.to_config().items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        parts = dict(
            transformer=SD3Transformer2DModel(**cfg),
            vae=autoencoder(),
            text_encoder=_clip(tokenizer_vocab_size(toks / "tokenizer"), CLIP_L_DIM, "quick_gelu", toks / "tokenizer"),
            text_encoder_2=_clip(tokenizer_vocab_size(toks / "tokenizer_2"), CLIP_G_DIM, "gelu", toks / "tokenizer_2"),
            text_encoder_3=_t5(tokenizer_vocab_size(toks / "tokenizer_3")),
        )
    from transformers import AutoTokenizer

    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        tokenizer=AutoTokenizer.from_pretrained(toks / "tokenizer"),
        tokenizer_2=AutoTokenizer.from_pretrained(toks / "tokenizer_2"),
        tokenizer_3=AutoTokenizer.from_pretrained(toks / "tokenizer_3"),
        **parts,
    )
    out = tmp / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # keep the tokenizers exactly as built
        shutil.rmtree(out / sub)
        shutil.copytree(toks / sub, out / sub)
    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text())
    index[VARIANT_HINT_KEY] = family
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_tiny_model(out_dir: str | Path, family: str = "medium", seed: int = 0, corpus: list[str] | None = None) -> Path:
    """Write a tiny SD3.5 pipeline folder of `family` (medium|large|large-turbo) to `out_dir` atomically."""
    if family not in TINY_FAMILIES:
        raise InvalidInputError(f"family={family!r} has no tiny model; choose one of {list(TINY_FAMILIES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; remove it or pick another OUT_DIR")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        _build(Path(tmp), family, seed, corpus or read_corpus())
        if out_dir.exists():
            out_dir.rmdir()
        (Path(tmp) / "model").rename(out_dir)
    return out_dir
