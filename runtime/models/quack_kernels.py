"""quack's compiled FP8 GEMM kernels, carried by a torch-fp8 engine set so a fresh process loads them
instead of compiling them (issue 18's cold start).

quack compiles each CuTe-DSL kernel on its first call and keeps the object file in its disk cache,
`<cache>/<fingerprint>/<key>.o` (`quack.cache.get_cache_path()`: $QUACK_CACHE_DIR, else
/tmp/<user>/quack_cache). The fingerprint hashes quack's sources and the Python, CUTLASS-DSL and
tvm-ffi versions; the key, the kernel and its arguments. The inductor artifacts of a set call our
custom ops (models/fp8_gemm.py), which call quack, so without these files a fresh machine compiles
them again inside its first image.

`kernel_files()` reads this quack build's cached objects (at the end of a build's warm-up: all of
this fingerprint's, also any the folder held before); `install_kernels(files)` writes the ones quack
does not have yet into its cache folder (each atomically: a temporary file renamed), skipping other
fingerprints' (quack would never look them up). Names are checked before any write: a set file
cannot place a file outside that folder.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Mapping

NAME = re.compile(r"[0-9a-f]{64}/[0-9a-f]{64}\.o")  # <fingerprint>/<sha256 key>.o, as quack.cache.jit names them


def _cache() -> tuple[Path, str] | None:
    """quack's cache folder and this process's fingerprint; None when this quack lays its cache out
    otherwise (the names used here are quack 0.6's): then nothing is carried and quack compiles."""
    try:
        from quack.cache.jit import _compute_source_fingerprint, get_cache_path
    except ImportError:
        return None
    return get_cache_path(), _compute_source_fingerprint()


def check_names(names: list[str], source: str) -> None:
    """ValueError naming `source` when any name is not `<fingerprint>/<key>.o`."""
    bad = [n for n in names if not NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"{source}: quack kernel names must be <64 hex>/<64 hex>.o, got {bad[:3]}")


def kernel_files(cache: tuple[Path, str] | None = None) -> dict[str, bytes]:
    """`<fingerprint>/<key>.o` -> bytes for every kernel in quack's cache under this fingerprint
    (`cache`: (folder, fingerprint) instead of quack's own, for tests)."""
    found = cache or _cache()
    if found is None:
        return {}
    root, fingerprint = found
    return {f"{fingerprint}/{p.name}": p.read_bytes() for p in sorted((root / fingerprint).glob("*.o"))}


def install_kernels(files: Mapping[str, bytes], source: str = "kernels",
                    cache: tuple[Path, str] | None = None) -> int:
    """Write each of `files` that quack's cache lacks (this fingerprint's only); returns how many."""
    check_names(list(files), source)
    if not files:
        return 0
    found = cache or _cache()
    if found is None:
        return 0
    root, fingerprint = found
    written = 0
    for name, data in files.items():
        fp, key = name.split("/")
        dest = root / fp / key
        if fp != fingerprint or dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".set-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written += 1
    return written
