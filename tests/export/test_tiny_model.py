"""The tiny checkpoints: deterministic, loadable by diffusers, structurally like SD3.5."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from sd35trt.export.tiny_model import write_tiny_model
from sd35trt.runtime import InvalidInputError

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) loads the checkpoint")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_identical_files_other_seed_other_weights(tiny_models, tmp_path: Path) -> None:
    again = write_tiny_model(tmp_path / "again", family="medium", seed=0)
    assert _digest(again) == _digest(tiny_models["medium"])
    other = _digest(write_tiny_model(tmp_path / "other", family="medium", seed=1))
    same = _digest(tiny_models["medium"])
    assert other["transformer/diffusion_pytorch_model.safetensors"] != same["transformer/diffusion_pytorch_model.safetensors"]
    assert other["tokenizer/vocab.json"] == same["tokenizer/vocab.json"]  # tokenizers depend on the corpus only


def test_loads_in_diffusers_with_sd35_structure(tiny_models) -> None:
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_models["medium"])
    t = pipe.transformer
    assert tuple(t.config.dual_attention_layers) == (0, 1) and t.config.qk_norm == "rms_norm"
    assert t.transformer_blocks[1].attn2 is not None and t.transformer_blocks[2].attn2 is None
    assert pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert type(pipe.text_encoder).__name__ == type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    assert pipe.scheduler.config.shift == 3.0
    assert (tiny_models["medium"] / "tokenizer" / "merges.txt").is_file()
    assert (tiny_models["medium"] / "tokenizer_3" / "spiece.model").is_file()
    large = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_models["large"]).transformer
    assert tuple(large.config.dual_attention_layers) == () and large.config.qk_norm == "rms_norm"


def test_turbo_is_large_with_turbo_hint(tiny_models) -> None:
    index = json.loads((tiny_models["turbo"] / "model_index.json").read_text())
    assert index["_sd35trt_family"] == "large-turbo"
    cfg = lambda v: json.loads((tiny_models[v] / "transformer" / "config.json").read_text())  # noqa: E731
    assert cfg("turbo") == cfg("large")


def test_generation_is_fast_and_leaves_the_caller_rng_alone(tmp_path: Path) -> None:
    import time

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    t0 = time.perf_counter()
    write_tiny_model(tmp_path / "fast", family="large", seed=5)
    assert time.perf_counter() - t0 < 20  # seconds on 2 cores (seen: ~2 s)
    assert torch.equal(torch.rand(1), before)


def test_refuses_non_empty_out_dir_and_bad_variant(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_tiny_model(tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    with pytest.raises(InvalidInputError, match="family='xl'"):
        write_tiny_model(tmp_path / "y", family="xl")
    assert not (tmp_path / "y").exists()
