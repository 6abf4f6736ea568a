"""write_single_file: Stability AI names that diffusers' own single-file loader reads back to the
folder's exact tensors; the released files' dtypes; atomic, deterministic output."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd35trt.export.single_file import write_single_file
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
