"""write_single_file: Stability AI names that diffusers' own single-file loader reads back to the
folder's exact tensors; the released files' dtypes; atomic, deterministic output."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd35trt.export.single_file import T5_FILES, write_single_file
from sd35trt.runtime import InvalidInputError
from sd35trt.runtime.weights import load_state_dict

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) is the independent reader")


@pytest.mark.parametrize("variant", ["medium", "large"])
def test_diffusers_reads_our_single_file_as_the_folder(variant: str, tiny_models, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # config from the local folder, nothing fetched
    folder = tiny_models[variant]
    file = write_single_file(folder, tmp_path / "single")
    assert file.name == f"sd3.5_{variant}.safetensors"
    for cls, sub in ((diffusers.SD3Transformer2DModel, "transformer"), (diffusers.AutoencoderKL, "vae")):
        model = cls.from_single_file(str(file), config=str(folder), subfolder=sub, local_files_only=True)
        ours, ref = model.state_dict(), load_state_dict(folder / sub)  # the VAE includes its encoder
        assert sorted(ours) == sorted(ref), sub
        assert all(torch.equal(ours[k], ref[k]) for k in ref), sub


@pytest.mark.parametrize("t5_dtype", ["fp16", "fp8"])
def test_transformers_reads_our_text_encoder_files_as_the_folder(t5_dtype: str, tiny_medium: Path, tmp_path: Path) -> None:
    """clip_l / clip_g / t5xxl_* read by transformers' own `from_pretrained` (each file as the
    `model.safetensors` beside the folder's config.json): no key missing, unexpected or mismatched,
    and every tensor == transformers' reading of the folder (T5 cast as the released files are)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    out = write_single_file(tiny_medium, tmp_path / "single", t5_dtype=t5_dtype).parent
    t5_cast = torch.float16 if t5_dtype == "fp16" else torch.float8_e4m3fn
    for cls, file, sub, cast in ((CLIPTextModelWithProjection, "clip_l.safetensors", "text_encoder", None),
                                 (CLIPTextModelWithProjection, "clip_g.safetensors", "text_encoder_2", None),
                                 (T5EncoderModel, T5_FILES[t5_dtype], "text_encoder_3", t5_cast)):
        hf = tmp_path / "hf" / sub
        hf.mkdir(parents=True)
        shutil.copy(tiny_medium / sub / "config.json", hf / "config.json")
        (hf / "model.safetensors").symlink_to(out / file)
        model, info = cls.from_pretrained(hf, output_loading_info=True, dtype=torch.float32)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (file, info)
        ours, ref = model.state_dict(), cls.from_pretrained(tiny_medium / sub, dtype=torch.float32).state_dict()
        assert sorted(ours) == sorted(ref), file
        for k, t in ref.items():
            want = t if cast is None else t.to(cast if cast is torch.float16 or t.dim() == 2 else torch.float16).float()
            assert torch.equal(ours[k], want), (file, k)


def test_released_layout_names_and_dtypes(tiny_medium: Path, tmp_path: Path) -> None:
    out = write_single_file(tiny_medium, tmp_path / "fp8", t5_dtype="fp8").parent
    assert sorted(p.name for p in out.iterdir()) == [
        "clip_g.safetensors", "clip_l.safetensors", "sd3.5_medium.safetensors", "t5xxl_fp8_e4m3fn.safetensors",
        "tokenizer", "tokenizer_2", "tokenizer_3"]
    with safe_open(str(out / "sd3.5_medium.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in keys  # MMDiT-X
    assert "model.diffusion_model.joint_blocks.2.x_block.attn2.qkv.weight" not in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in keys
    with safe_open(str(out / "t5xxl_fp8_e4m3fn.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        dims = {k: len(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {dtypes[k] for k in dtypes if dims[k] == 2} == {"F8_E4M3"}
    assert {dtypes[k] for k in dtypes if dims[k] != 2} == {"F16"}
    assert "encoder.embed_tokens.weight" not in dtypes  # tied to shared.weight, stored once


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_atomic_and_refuses_bad_arguments(tiny_medium: Path, tmp_path: Path) -> None:
    a = write_single_file(tiny_medium, tmp_path / "a").parent
    b = write_single_file(tiny_medium, tmp_path / "b").parent
    assert _digest(a) == _digest(b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folders left
    with pytest.raises(FileExistsError, match="not empty"):
        write_single_file(tiny_medium, a)
    with pytest.raises(InvalidInputError, match="t5_dtype='bf16'"):
        write_single_file(tiny_medium, tmp_path / "c", t5_dtype="bf16")
    assert not (tmp_path / "c").exists()
