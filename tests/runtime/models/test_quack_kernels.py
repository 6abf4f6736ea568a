"""models/quack_kernels.py: the kernels a set carries, read from and written into a quack-style cache
folder (`<folder>/<fingerprint>/<key>.o`) given as (folder, fingerprint): quack itself is not needed
for the file handling (on the GPU host the folder and fingerprint are quack's own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd35trt.runtime.models.quack_kernels import install_kernels, kernel_files

FP, OTHER = "1" * 64, "2" * 64


def _key(i: int) -> str:
    return f"{i:064x}.o"


def test_kernels_are_read_per_fingerprint_and_installed_once(tmp_path: Path) -> None:
    build, fresh = tmp_path / "build", tmp_path / "fresh"
    (build / FP).mkdir(parents=True)
    (build / OTHER).mkdir()
    for i in range(3):
        (build / FP / _key(i)).write_bytes(bytes([i]) * (i + 1))
    (build / FP / "x.lock").write_bytes(b"")  # quack's lock files are not kernels
    (build / OTHER / _key(9)).write_bytes(b"another quack build")
    files = kernel_files((build, FP))
    assert files == {f"{FP}/{_key(i)}": bytes([i]) * (i + 1) for i in range(3)}
    (fresh / FP).mkdir(parents=True)
    (fresh / FP / _key(0)).write_bytes(b"already there")
    theirs = {f"{OTHER}/{_key(9)}": b"x"}
    assert install_kernels({**files, **theirs}, cache=(fresh, FP)) == 2  # key 0 kept, OTHER's skipped
    assert (fresh / FP / _key(0)).read_bytes() == b"already there"
    assert kernel_files((fresh, FP)) == {**files, f"{FP}/{_key(0)}": b"already there"}
    assert not (fresh / OTHER).exists() and not list((fresh / FP).glob(".set-*"))  # no temporaries left
    assert install_kernels(files, cache=(fresh, FP)) == 0


@pytest.mark.parametrize("name", [f"../{_key(1)}", f"{FP}/../../{_key(1)}", f"{FP}/{_key(1)}.so", "/etc/x.o"])
def test_a_name_outside_the_cache_is_refused_before_any_write(tmp_path: Path, name: str) -> None:
    files = {f"{FP}/{_key(0)}": b"ok", name: b"bad"}
    with pytest.raises(ValueError, match="set.safetensors: quack kernel names must be"):
        install_kernels(files, "set.safetensors", cache=(tmp_path, FP))
    assert not any(tmp_path.rglob("*"))
