"""One-pass read + verify of safetensors files (runtime/set_reader.py), on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35trt.runtime.files import sha256_file
from sd35trt.runtime.set_reader import chunk_hashes, read_verified


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w8": (torch.randn(37, 53, generator=g) * 10).to(torch.float8_e4m3fn),  # odd byte count
            "b": torch.randn(53, generator=g).bfloat16(), "s": torch.tensor(0.5), "ids": torch.arange(7),
            "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4)}


def test_reads_what_safetensors_reads_and_refuses_a_changed_byte(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), str(path), metadata={"aliases": "{}"})
    chunk = 1000  # many pieces, boundaries inside the header and inside tensors
    want = chunk_hashes(path, chunk)
    assert len(want) == -(-path.stat().st_size // chunk) and chunk_hashes(path, 1 << 30) != want
    got, meta = read_verified(path, want, torch.device("cpu"), ValueError, chunk=chunk)
    ref = load_file(str(path))
    assert meta == {"aliases": "{}"} and set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)), k
    assert len(chunk_hashes(path, 1 << 30)) == 1
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 differs"):
        read_verified(path, want, torch.device("cpu"), ValueError, chunk=chunk)
    assert sha256_file(path)  # still a readable file: only its content changed
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors"):
        read_verified(path, None, torch.device("cpu"), ValueError)


def test_every_tensor_starts_aligned(tmp_path: Path) -> None:
    from sd35trt.runtime.set_reader import ALIGN

    path = tmp_path / "y.safetensors"
    save_file(_tensors(), str(path))
    got, _ = read_verified(path, chunk_hashes(path), torch.device("cpu"), ValueError)
    base = min(t.untyped_storage().data_ptr() for t in got.values())
    assert all((t.data_ptr() - base) % ALIGN == 0 for t in got.values() if t.numel())
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == 1  # one buffer per file


def test_files_queued_on_one_pool_read_as_alone(tmp_path: Path) -> None:
    """Several files' pieces on one pool (as the set backend loads): each file's tensors are its own,
    and a changed file is refused without spoiling the others."""
    from concurrent.futures import ThreadPoolExecutor

    from sd35trt.runtime.set_reader import start_verified

    paths, want = [], []
    for i in range(3):
        paths.append(tmp_path / f"f{i}.safetensors")
        save_file({k: v + i if v.dtype in (torch.float32, torch.bfloat16) else v for k, v in _tensors().items()},
                  str(paths[-1]))
        want.append(chunk_hashes(paths[-1], 100))
    bad = bytearray(paths[1].read_bytes())
    bad[-1] ^= 1
    paths[1].write_bytes(bytes(bad))
    with ThreadPoolExecutor(2) as pool:  # every file's pieces queued before any is waited for
        waits = [start_verified(p, h, torch.device("cpu"), ValueError, pool, chunk=100) for p, h in zip(paths, want)]
        got = {i: waits[i]()[0] for i in (2, 0)}
        with pytest.raises(ValueError, match="sha256 differs"):
            waits[1]()
    for i in (0, 2):
        ref = load_file(str(paths[i]))
        assert set(got[i]) == set(ref)
        for k in ref:
            assert torch.equal(got[i][k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)), (i, k)
