"""What export folders and engine sets carry beside their graphs or engines: the tokenizers."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..runtime.checkpoint import TOKENIZER_DIRS, Checkpoint
from ..runtime.files import write_json_atomic


def copy_tokenizers(ckpt: Checkpoint, out: Path) -> None:
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
