"""`Checkpoint`: one interface over the two ways SD3.5 is kept on disk.

* a diffusers folder (transformer/, vae/, text_encoder*/, tokenizer*/, model_index.json), and
* Stability AI / ComfyUI single files: `sd3.5_large.safetensors` (MMDiT under
  `model.diffusion_model.*`, VAE under `first_stage_model.*`, original SD3/LDM names) with
  `clip_l.safetensors`, `clip_g.safetensors` and optionally `t5xxl_fp16.safetensors` or
  `t5xxl_fp8_e4m3fn.safetensors` beside it (or in `text_encoders/`), and the tokenizer folders of
  the diffusers release beside it.

Both hand out the same things: a `VariantConfig`, state dicts in diffusers / transformers names and
the tokenizer folders. A single file's architecture is read from tensor shapes, never from its
name; what shapes cannot tell comes from the file's `sd35trt.config` metadata (our tiny files) or
else from the released SD3.5 conventions.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .architecture import text_config, transformer_spec, vae_spec
from .config import FAMILY_SAMPLING, VARIANTS, VariantConfig
from .engine_manifest import FORMAT as ENGINES_FORMAT
from .engine_manifest import EngineManifest
from .errors import CheckpointError, InvalidInputError
from .files import MANIFEST, read_json
from .manifest import ExportManifest
from .weights import (
    MMDIT_SAI_NAMES,
    VAE_SAI_NAMES,
    component_files,
    finish_text_state,
    load_prefixed,
    load_state_dict,
    read_header,
    read_renamed,
    read_tensor,
    rename_state,
)

TEXT_ENCODERS = ("clip_l", "clip_g", "t5")
MODEL_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
# File names users keep the text encoders under, first found wins.
ENCODER_FILES = {
    "clip_l": ("clip_l.safetensors",),
    "clip_g": ("clip_g.safetensors",),
    "t5": ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors"),
}
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2", "tokenizer_3")
DEFAULT_TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}
# Safetensors metadata key of a JSON with what tensor shapes cannot tell (written by our tiny
# files). Absent in released files, where the SD3.5 conventions below apply instead.
CONFIG_KEY = "sd35trt.config"



class Checkpoint(ABC):
    """An SD3.5 model on disk. `files` names where each component comes from (None: absent).
    It is os.PathLike (-> `path`), so backends that want a path can take one as it is."""

    path: Path
    config: VariantConfig
    files: dict[str, Path | None]
    default_backend = "torch"  # what `Pipeline.from_pretrained(path)` runs it with

    def __fspath__(self) -> str:
        return str(self.path)

    @staticmethod
    def open(
        path: str | Path,
        family: str | None = None,
        clip_l: str | Path | None = None,
        clip_g: str | Path | None = None,
        t5: str | Path | bool | None = None,
        tokenizers: str | Path | None = None,
    ) -> Checkpoint:
        """A diffusers folder or a model `.safetensors` file. `family` (large|medium|large-turbo)
        overrides the detected one; for a file, `clip_l`/`clip_g`/`t5` name the encoder files
        (found beside it by default) and `tokenizers` the folder holding tokenizer*/; `t5=False`
        leaves T5 out (the runtime then uses zeros)."""
        path = Path(path)
        if (path / MANIFEST).is_file():  # written by `sd35trt export` / `sd35trt build`
            return ExportedFolder(path, family)
        if path.is_dir():
            for key, value in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5), ("tokenizers", tokenizers)):
                if value is not None and not isinstance(value, bool):
                    raise InvalidInputError(
                        f"{key}={str(value)!r} applies to single-file checkpoints, but {path} is a "
                        f"diffusers folder (its parts live in its subfolders); drop {key}="
                    )
            return FolderCheckpoint(path, family, load_t5=t5 is not False)
        refuse_pickle(path)
        if path.is_file() and path.suffix in (".safetensors", ".sft"):
            return SingleFileCheckpoint(path, family, clip_l, clip_g, t5, tokenizers)
        raise CheckpointError(
            f"model path {path} is not a folder or a .safetensors file; pass an SD3.5 diffusers "
            f"folder or a single-file checkpoint such as sd3.5_large.safetensors"
        )

    @abstractmethod
    def transformer_state(self) -> dict[str, torch.Tensor]:
        """MMDiT weights in diffusers SD3Transformer2DModel names."""

    def transformer_tensor(self, key: str) -> torch.Tensor | None:
        """One MMDiT tensor by its diffusers name, read alone; None when this checkpoint has no
        weights or lacks it (LoRA fusing from the source weights, runtime/lora_source.py)."""
        return None

    @abstractmethod
    def vae_decoder_state(self) -> dict[str, torch.Tensor]:
        """VAE decoder weights in diffusers AutoencoderKL names (`decoder.*`)."""

    @abstractmethod
    def vae_encoder_state(self) -> dict[str, torch.Tensor]:
        """VAE encoder weights in diffusers AutoencoderKL names (`encoder.*`), for img2img export."""

    @abstractmethod
    def _text_source(self, name: str) -> tuple[Any, dict[str, torch.Tensor]] | None:
        """(transformers config, raw state dict) of one text encoder, or None."""

    @abstractmethod
    def tokenizer_dirs(self) -> tuple[Path, Path, Path | None]:
        """Folders of the CLIP-L, CLIP-G and T5 tokenizers (T5: None when absent)."""

    @abstractmethod
    def tokenizer_classes(self) -> tuple[str, str, str]:
        """transformers class names of the three tokenizers."""

    def text_encoder(
        self, name: str, dtype: torch.dtype = torch.float32
    ) -> tuple[Any, dict[str, torch.Tensor]] | None:
        """(transformers config, state dict) of "clip_l", "clip_g" or "t5"; None when absent.
        FP8 weights are upcast to `dtype` (times their `scale_weight` when the file has one);
        other tensors keep their stored dtype."""
        if name not in TEXT_ENCODERS:
            raise InvalidInputError(f"text encoder {name!r} is unknown; choose one of {TEXT_ENCODERS}")
        found = self._text_source(name)
        if found is None:
            return None
        cfg, state = found
        return cfg, finish_text_state(state, dtype)


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is a pickle checkpoint ({path.suffix}); pickle files are never loaded (they can "
            f"run code). Use the .safetensors release of this model, or convert it to safetensors"
        )


def tokenizer_classes(root: Path) -> tuple[str, str, str]:
    """Classes named in `root/model_index.json` (diffusers layout), else SD3's defaults."""
    index_file = root / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    return tuple(  # type: ignore[return-value]
        (index.get(sub) or [None, default])[1] or default
        for sub, default in zip(TOKENIZER_DIRS, DEFAULT_TOKENIZER_CLASSES)
    )


class FolderCheckpoint(Checkpoint):
    """A diffusers-layout folder."""

    def __init__(self, path: Path, family: str | None = None, load_t5: bool = True) -> None:
        self.path = path
        self.config = VariantConfig.from_checkpoint(path, family=family)
        t5 = path / _FOLDERS["t5"]
        self.files = {
            "transformer": path / "transformer", "vae": path / "vae",
            "clip_l": path / _FOLDERS["clip_l"], "clip_g": path / _FOLDERS["clip_g"],
            "t5": t5 if load_t5 and t5.is_dir() else None,
        }

    def transformer_state(self) -> dict[str, torch.Tensor]:
        return load_state_dict(self.path / "transformer")

    def transformer_tensor(self, key: str) -> torch.Tensor | None:
        return read_tensor(component_files(self.path / "transformer"), key)

    def vae_decoder_state(self) -> dict[str, torch.Tensor]:
        return load_state_dict(self.path / "vae", "decoder.")

    def vae_encoder_state(self) -> dict[str, torch.Tensor]:
        return load_state_dict(self.path / "vae", "encoder.")

    def _text_source(self, name: str) -> tuple[Any, dict[str, torch.Tensor]] | None:
        from transformers import CLIPTextConfig, T5Config  # not AutoConfig: 4.x lacks clip_text_model

        folder = self.files[name]
        if folder is None:
            return None
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}/config.json is missing; the text encoder folder is incomplete")
        cfg = (T5Config if name == "t5" else CLIPTextConfig).from_pretrained(folder)
        return cfg, load_state_dict(folder)

    def tokenizer_dirs(self) -> tuple[Path, Path, Path | None]:
        t5 = self.path / "tokenizer_3"
        return self.path / "tokenizer", self.path / "tokenizer_2", t5 if t5.is_dir() else None

    def tokenizer_classes(self) -> tuple[str, str, str]:
        return tokenizer_classes(self.path)


class ExportedFolder(Checkpoint):
    """An exported ONNX folder or an engine set: config from its manifest, tokenizers beside it, no
    torch weights (the runtimes that read graphs or engines need none)."""

    def __init__(self, path: Path, family: str | None = None) -> None:
        self.path = path
        doc = read_json(path / MANIFEST)
        engines = isinstance(doc, dict) and doc.get("format") == ENGINES_FORMAT
        self.manifest: ExportManifest | EngineManifest = (EngineManifest if engines else ExportManifest).load(path)
        self.default_backend = self.manifest.flavor if engines else "onnxruntime"
        config = self.manifest.variant
        self.config = config.with_family(family) if family else config
        self.files = {c: path / e.file for c, e in self.manifest.components.items()}

    def _no_weights(self, *_: object):
        raise CheckpointError(
            f"{self.path} holds exported graphs or engines, not torch weights; use backend='onnxruntime' "
            f"(ONNX) or 'tensorrt'/'tensorrt-rtx' (engines), or point the torch backend at the original checkpoint"
        )

    transformer_state = vae_decoder_state = vae_encoder_state = _text_source = _no_weights

    def tokenizer_dirs(self) -> tuple[Path, Path, Path | None]:
        t5 = self.path / "tokenizer_3"
        return self.path / "tokenizer", self.path / "tokenizer_2", t5 if t5.is_dir() and "t5" in self.files else None

    def tokenizer_classes(self) -> tuple[str, str, str]:
        return tokenizer_classes(self.path)


class SingleFileCheckpoint(Checkpoint):
    """`sd3.5_*.safetensors` (MMDiT + VAE, Stability AI names) plus separate encoder files."""

    def __init__(
        self, file: Path, family: str | None, clip_l: str | Path | None, clip_g: str | Path | None,
        t5: str | Path | bool | None, tokenizers: str | Path | None,
    ) -> None:
        self.path = file
        shapes, meta = read_header(file)
        _check_model_file(file, shapes)
        hints = json.loads(meta.get(CONFIG_KEY, "{}"))
        spec = transformer_spec(_strip(shapes, MODEL_PREFIX), hints.get("transformer", {}), file)
        vae = vae_spec(_strip(shapes, VAE_PREFIX), hints.get("vae", {}), file)
        self.files = {"transformer": file, "vae": file}
        self.files.update({n: _find_encoder(file, n, v) for n, v in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5))})
        self._headers = {n: read_header(f) for n, f in self.files.items() if n in TEXT_ENCODERS and f}
        dims = {n: _check_encoder_file(self.files[n], n, self._headers[n][0]) for n in self._headers}
        self.tokenizers = Path(tokenizers) if tokenizers is not None else file.parent
        family = family or hints.get("family") or ("medium" if spec.dual_attention_layers else "large")
        if family not in FAMILY_SAMPLING:
            raise CheckpointError(f"unknown SD3.5 family {family!r}; expected one of {sorted(FAMILY_SAMPLING)}")
        name = next((n for n, v in VARIANTS.items() if v.transformer == spec and v.family == family), None)
        self.config = VariantConfig(
            name=name or f"custom-{family}", family=family, transformer=spec, vae=vae,
            clip_l_dim=dims["clip_l"], clip_g_dim=dims["clip_g"],
            sampling=replace(FAMILY_SAMPLING[family], shift=float(hints.get("shift", 3.0))),
        )

    def transformer_state(self) -> dict[str, torch.Tensor]:
        state = load_prefixed(self.path, MODEL_PREFIX)
        last = self.config.transformer.num_layers - 1
        return rename_state(state, MMDIT_SAI_NAMES, "diffusers", self.path, last=last)

    def transformer_tensor(self, key: str) -> torch.Tensor | None:
        last = self.config.transformer.num_layers - 1
        return read_renamed(self.path, MODEL_PREFIX, key, MMDIT_SAI_NAMES, last=last)

    def _vae_part(self, part: str) -> dict[str, torch.Tensor]:
        state = {part + k: t for k, t in load_prefixed(self.path, VAE_PREFIX + part).items()}
        n_up = len(self.config.vae.block_out_channels)
        return rename_state(state, VAE_SAI_NAMES, "diffusers", self.path, n_up=n_up)

    def vae_decoder_state(self) -> dict[str, torch.Tensor]:
        return self._vae_part("decoder.")

    def vae_encoder_state(self) -> dict[str, torch.Tensor]:
        return self._vae_part("encoder.")

    def _text_source(self, name: str) -> tuple[Any, dict[str, torch.Tensor]] | None:
        file = self.files[name]
        if file is None:
            return None
        shapes, meta = self._headers[name]
        cfg = text_config(name, shapes, json.loads(meta.get(CONFIG_KEY, "{}")), file)
        return cfg, load_prefixed(file, "")

    def tokenizer_dirs(self) -> tuple[Path, Path, Path | None]:
        root = self.tokenizers
        need = list(TOKENIZER_DIRS if self.files["t5"] else TOKENIZER_DIRS[:2])
        missing = [d for d in need if not (root / d).is_dir()]
        if missing:
            raise CheckpointError(
                f"{self.path} is a single-file checkpoint and carries no tokenizers: the folders "
                f"{', '.join(d + '/' for d in need)} are needed in {root} (missing: "
                f"{', '.join(d + '/' for d in missing)}); copy them there from the SD3.5 diffusers "
                f"release (stable-diffusion-3.5-*/tokenizer*/), or pass tokenizers=<folder holding them>"
            )
        t5 = root / "tokenizer_3"
        return root / "tokenizer", root / "tokenizer_2", t5 if t5.is_dir() else None

    def tokenizer_classes(self) -> tuple[str, str, str]:
        return tokenizer_classes(self.tokenizers)


def _strip(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}


def _check_model_file(file: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    if any(k.startswith(MODEL_PREFIX + "joint_blocks.") for k in shapes):
        if not any(k.startswith(VAE_PREFIX + "decoder.") for k in shapes):
            raise CheckpointError(
                f"{file} holds an MMDiT but no VAE (first_stage_model.decoder.*); use the full "
                f"release file (e.g. sd3.5_large.safetensors) or a diffusers folder"
            )
        return
    what = ("it looks like a CLIP text encoder, which goes in clip_l= or clip_g=" if _is_clip(shapes)
            else "it looks like a T5 text encoder, which goes in t5=" if _is_t5(shapes)
            else f"its tensors are named like {sorted(shapes)[:3]}")
    raise CheckpointError(
        f"{file} is not an SD3/SD3.5 model file (no {MODEL_PREFIX}joint_blocks.* tensors; {what}); "
        f"pass the model file (e.g. sd3.5_large.safetensors or sd3.5_medium.safetensors) or a "
        f"diffusers folder"
    )


def _is_clip(shapes: dict) -> bool:
    return "text_model.embeddings.token_embedding.weight" in shapes


def _is_t5(shapes: dict) -> bool:
    return "shared.weight" in shapes or "encoder.embed_tokens.weight" in shapes



def _check_encoder_file(file: Path, name: str, shapes: dict[str, tuple[int, ...]]) -> int:
    """The encoder's width; raises when `file` is not that kind of encoder."""
    ok = _is_t5(shapes) if name == "t5" else _is_clip(shapes)
    if not ok:
        want = "T5EncoderModel (shared.weight, encoder.block.*)" if name == "t5" else \
            "CLIPTextModelWithProjection (text_model.*, text_projection.weight)"
        raise CheckpointError(
            f"{file} was taken as {name} but is not a {want} file (names like {sorted(shapes)[:3]}); "
            f"pass the right file as {name}=PATH"
        )
    key = "text_model.embeddings.token_embedding.weight" if name != "t5" else (
        "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight")
    return shapes[key][1]


def _find_encoder(model_file: Path, name: str, given: str | Path | bool | None) -> Path | None:
    if given is False and name == "t5":
        return None
    if given is not None and given is not True:
        path = Path(given)
        refuse_pickle(path)
        if not path.is_file():
            raise CheckpointError(f"{name}={str(path)!r} does not exist; pass the path of its .safetensors file")
        return path
    dirs = (model_file.parent, model_file.parent / "text_encoders")
    found = next((d / n for d in dirs for n in ENCODER_FILES[name] if (d / n).is_file()), None)
    if found is None and name != "t5":
        raise CheckpointError(
            f"{model_file} carries no text encoders and {' or '.join(ENCODER_FILES[name])} is not in "
            f"{dirs[0]} or {dirs[1]}; put it there or pass {name}=PATH"
        )
    return found


# --- architecture from tensor shapes ----------------------------------------------------------
