"""manifest.json of an exported model folder (ONNX today, engine sets later).

The manifest is written last and atomically; a component is trusted only when its manifest entry
exists and the file's sha256 matches, so an interrupted export never leaves a file a later run
(or the runtime) trusts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import TOKENIZER_DIRS
from .config import VariantConfig
from .files import atomic_write
from .errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "sd35trt-onnx/1"
ENGINES_FORMAT = "sd35trt-engines/1"  # engine sets (`sd35trt build`); see engine_manifest.py


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, doc: Any) -> None:
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def read_manifest(folder: Path, formats: tuple[str, ...] = (FORMAT,)) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; export the model first: sd35trt export --model … --out {folder}")
    doc = json.loads(path.read_text())
    if doc.get("format") not in formats:
        raise CheckpointError(f"{path}: format {doc.get('format')!r}, this reads {' or '.join(map(repr, formats))}; re-export")
    return doc


def copy_tokenizers(ckpt, out: Path) -> None:
    """Copy a checkpoint's tokenizer*/ folders into `out` (each atomically, once) and write the
    model_index.json naming their classes, so an exported folder or engine set is self-contained."""
    for sub, src in zip(TOKENIZER_DIRS, ckpt.tokenizer_dirs()):
        if src is not None and not (out / sub).is_dir():
            tmp = out / f".{sub}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            tmp.rename(out / sub)
    classes = ckpt.tokenizer_classes()
    write_json_atomic(out / "model_index.json", {sub: ["transformers", cls] for sub, cls in zip(TOKENIZER_DIRS, classes)})


def manifest_config(folder: Path) -> VariantConfig:
    return VariantConfig.from_dict(read_manifest(folder)["variant"])


def exported_folder(path: Path, family: str | None = None):
    """A `Checkpoint` view of an exported folder or an engine set: config from the manifest,
    tokenizers beside it, no torch weights (runtimes that read graphs or engines need none)."""
    from .checkpoint import Checkpoint, tokenizer_classes

    class ExportedFolder(Checkpoint):
        def __init__(self) -> None:
            self.path = path
            self.manifest = read_manifest(path, (FORMAT, ENGINES_FORMAT))
            config = VariantConfig.from_dict(self.manifest["variant"])
            self.config = config.with_family(family) if family else config
            self.files = {c: path / e["file"] for c, e in self.manifest["components"].items()}

        def _no_weights(self, *_: object):
            raise CheckpointError(
                f"{path} holds exported graphs or engines, not torch weights; use backend='onnxruntime' "
                f"(ONNX) or 'tensorrt'/'tensorrt-rtx' (engines), or point the torch backend at the original checkpoint"
            )

        transformer_state = vae_decoder_state = vae_encoder_state = _text_source = _no_weights

        def tokenizer_dirs(self) -> tuple[Path, Path, Path | None]:
            t5 = path / "tokenizer_3"
            return path / "tokenizer", path / "tokenizer_2", t5 if t5.is_dir() and "t5" in self.files else None

        def tokenizer_classes(self) -> tuple[str, str, str]:
            return tokenizer_classes(path)

    return ExportedFolder()
