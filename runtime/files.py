"""Artifact files: atomic writes (temp file beside the target, fsync, mode 0644, rename: a reader never
sees a half-written artifact, an interrupted write leaves only the previous file or none), content
hashes, and the JSON documents the manifests are made of."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


TEMP_SUFFIX = ".tmp"  # every temp file or folder beside an artifact is named .<artifact>.<random>.tmp


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(file)` on a temp file beside `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the hidden `.*.tmp` files and folders a killed writer left in `folder` (a process
    that is still writing there would lose its temp files: one writer per folder at a time)."""
    removed = []
    folder = Path(folder)
    for p in folder.glob(f".*{TEMP_SUFFIX}") if folder.is_dir() else ():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


MANIFEST = "manifest.json"  # the one manifest file name of export folders and engine sets


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_matches(path: Path, sha256: str) -> bool:
    """The file exists and has the recorded content hash (the one freshness test of artifacts)."""
    return path.is_file() and sha256_file(path) == sha256


def write_json_atomic(path: Path, doc: Any) -> None:
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: Path) -> Any:
    """A JSON document, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
