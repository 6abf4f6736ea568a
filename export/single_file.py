"""Write a diffusers-layout SD3.5 folder as the single files users keep (Stability AI / ComfyUI).

    out_dir/sd3.5_medium.safetensors    MMDiT (model.diffusion_model.*) + VAE (first_stage_model.*)
    out_dir/clip_l.safetensors          CLIPTextModelWithProjection, transformers names
    out_dir/clip_g.safetensors
    out_dir/t5xxl_fp16.safetensors      T5EncoderModel (or t5xxl_fp8_e4m3fn.safetensors)
    out_dir/tokenizer{,_2,_3}/          copied: single files carry no tokenizers

Names go through the same table the runtime reads with (`runtime/weights.py`), in the other
direction. The model and CLIP files keep the folder's dtype; T5 is cast like the released files
(fp16, or float8_e4m3fn for every matrix with the rest in fp16). Each file's metadata carries
what tensor shapes cannot tell (`sd35trt.config`), which released files lack. Used for tests.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..runtime.architecture import CLIP_HINTS, T5_HINTS
from ..runtime.checkpoint import CONFIG_KEY, MODEL_PREFIX, TOKENIZER_DIRS, VAE_PREFIX, FolderCheckpoint
from ..runtime.errors import InvalidInputError
from ..runtime.weights import MMDIT_SAI_NAMES, VAE_SAI_NAMES, load_state_dict, rename_state

T5_FILES = {"fp16": "t5xxl_fp16.safetensors", "fp8": "t5xxl_fp8_e4m3fn.safetensors"}


def model_file_name(family: str) -> str:
    """sd3.5_large.safetensors, sd3.5_medium.safetensors, sd3.5_large_turbo.safetensors."""
    return f"sd3.5_{family.replace('-', '_')}.safetensors"


def _meta(config: dict) -> dict[str, str]:
    # one key only: safetensors writes metadata in hash order, so two keys would make the bytes vary
    return {CONFIG_KEY: json.dumps(config, sort_keys=True)}


def _model_file(ckpt: FolderCheckpoint) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    cfg = ckpt.config
    last, n_up = cfg.transformer.num_layers - 1, len(cfg.vae.block_out_channels)
    mmdit = rename_state(ckpt.transformer_state(), MMDIT_SAI_NAMES, "sai", ckpt.path, last=last)
    vae = rename_state(load_state_dict(ckpt.path / "vae"), VAE_SAI_NAMES, "sai", ckpt.path, n_up=n_up)
    state = {MODEL_PREFIX + k: t for k, t in mmdit.items()} | {VAE_PREFIX + k: t for k, t in vae.items()}
    vae_cfg = asdict(cfg.vae) | {"block_out_channels": list(cfg.vae.block_out_channels)}
    meta = {"family": cfg.family, "shift": cfg.sampling.shift, "transformer": cfg.transformer.to_config(),
            "vae": vae_cfg}
    return state, _meta(meta)


def _t5_state(state: dict[str, torch.Tensor], t5_dtype: str) -> dict[str, torch.Tensor]:
    state = {k: t for k, t in state.items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    if t5_dtype == "fp16":
        return {k: t.to(torch.float16) for k, t in state.items()}
    return {k: t.to(torch.float8_e4m3fn if t.dim() == 2 else torch.float16) for k, t in state.items()}


def _write_parts(ckpt: FolderCheckpoint, out: Path, t5_dtype: str) -> None:
    state, meta = _model_file(ckpt)
    save_file(state, str(out / model_file_name(ckpt.config.family)), metadata=meta)
    for name, file in (("clip_l", "clip_l.safetensors"), ("clip_g", "clip_g.safetensors"), ("t5", T5_FILES[t5_dtype])):
        found = ckpt.text_encoder(name)
        if found is None:
            continue
        cfg, state = found
        if name == "t5":
            state = _t5_state(state, t5_dtype)
        hints = {k: v for k, v in cfg.to_dict().items() if k in (T5_HINTS if name == "t5" else CLIP_HINTS)}
        save_file({k: t.contiguous() for k, t in state.items()}, str(out / file), metadata=_meta(hints))
    for sub in TOKENIZER_DIRS:
        if (ckpt.path / sub).is_dir():
            shutil.copytree(ckpt.path / sub, out / sub)


def write_single_file(diffusers_folder: str | Path, out_dir: str | Path, t5_dtype: str = "fp16") -> Path:
    """Convert an SD3.5 diffusers folder into the single-file layout in `out_dir`, atomically
    (built in a temporary folder beside it, then renamed). Returns the model file's path."""
    if t5_dtype not in T5_FILES:
        raise InvalidInputError(f"t5_dtype={t5_dtype!r} is not supported; choose one of {sorted(T5_FILES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; remove it or pick another output folder")
    ckpt = FolderCheckpoint(Path(diffusers_folder))  # validates the folder before writing anything
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        staged = Path(tmp) / "out"
        staged.mkdir()
        _write_parts(ckpt, staged, t5_dtype)
        if out_dir.exists():
            out_dir.rmdir()
        staged.rename(out_dir)
    return out_dir / model_file_name(ckpt.config.family)
