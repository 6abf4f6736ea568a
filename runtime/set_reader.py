"""One pass over a safetensors file: read, verify, upload.

A torch-fp8 engine set is ~14 GiB; reading it once to hash and once more to load costs a fresh
process seconds it cannot spare. Here each `CHUNK`-byte piece of the file is read by a worker
thread (os.preadv into a reused, pinned staging buffer), hashed (sha256; hashlib drops the GIL)
and copied to its place in one device buffer per file on the thread's own CUDA stream. The
tensors are views of that buffer (one allocation per file, each tensor at an ALIGN-byte offset);
when a piece's hash differs from the manifest's, the file is refused before any module sees a
tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch

CHUNK = 256 << 20  # bytes per verified piece of a set file (the manifest's sha256_chunks)
BLOCK = 32 << 20  # bytes per read into a staging buffer
ALIGN = 256  # bytes: every tensor starts on this boundary of the device buffer (safetensors only aligns to 8;
#             a view at an unaligned address makes inductor copy it on every call and cuBLAS pick slower kernels)
DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16,
          "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _workers() -> int:
    return min(16, os.cpu_count() or 1)


_LOCAL = threading.local()  # per reader thread: its pinned staging buffer and CUDA stream, reused across files


def chunk_hashes(path: str | Path, chunk: int = CHUNK) -> list[str]:
    """sha256 of each `chunk`-byte piece of the file, computed in parallel."""
    with ThreadPoolExecutor(_workers()) as pool:
        return _start_pass(Path(path), chunk, None, (), pool)()


def _staging(dest: torch.Tensor | None) -> tuple[torch.Tensor, memoryview, object]:
    cuda = dest is not None and dest.device.type == "cuda"
    key = (str(dest.device) if cuda else "cpu")
    bufs = _LOCAL.__dict__.setdefault("bufs", {})
    if key not in bufs:
        buf = torch.empty(BLOCK, dtype=torch.uint8, pin_memory=cuda)
        bufs[key] = (buf, memoryview(buf.numpy()), torch.cuda.Stream(dest.device) if cuda else None)
    return bufs[key]


def _start_pass(path: Path, chunk: int, dest: torch.Tensor | None, spans: Sequence[tuple[int, int, int]],
                pool: ThreadPoolExecutor) -> Callable[[], list[str]]:
    """Queue on `pool` the hashing of every piece of `path` and, with `dest`, the copy of each span
    (file start, file end, dest start) of the file into it; returns `wait() -> the pieces' hashes`."""
    import bisect

    starts = [a for a, _, _ in spans]
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)

    def piece(offset: int) -> str:
        h, end = hashlib.sha256(), min(offset + chunk, size)
        buf, view, stream = _staging(dest)
        pos = offset
        while pos < end:
            n = os.preadv(fd, [view[: min(BLOCK, end - pos)]], pos)
            if n <= 0:
                raise OSError(f"{path}: short read at byte {pos}")
            if stream is not None:
                stream.synchronize()  # the previous copy out of this staging buffer is done
            h.update(view[:n])
            if dest is not None:
                first = max(bisect.bisect_right(starts, pos) - 1, 0)
                for a, b, d in spans[first:]:  # the spans this block overlaps
                    if a >= pos + n:
                        break
                    lo, hi = max(a, pos), min(b, pos + n)
                    if lo >= hi:
                        continue
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            dest[d + lo - a: d + hi - a].copy_(buf[lo - pos: hi - pos], non_blocking=True)
                    else:
                        dest[d + lo - a: d + hi - a].copy_(buf[lo - pos: hi - pos])
            pos += n
        if stream is not None:
            stream.synchronize()
        return h.hexdigest()

    try:
        futures = [pool.submit(piece, off) for off in range(0, max(size, 1), chunk)]
    except BaseException:
        os.close(fd)
        raise

    def wait() -> list[str]:
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()
            import concurrent.futures

            concurrent.futures.wait(futures)  # no piece still reads fd
            os.close(fd)

    return wait


def read_verified(path: str | Path, expected: Sequence[str] | None, device: torch.device,
                  refuse: Callable[[str], Exception],
                  chunk: int = CHUNK) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, read once onto `device`; `refuse(why)` is raised
    when the file's chunk hashes differ from `expected` or its header is not safetensors."""
    with ThreadPoolExecutor(_workers()) as pool:
        return start_verified(path, expected, device, refuse, pool, chunk)()


def start_verified(path: str | Path, expected: Sequence[str] | None, device: torch.device,
                   refuse: Callable[[str], Exception], pool: ThreadPoolExecutor,
                   chunk: int = CHUNK) -> Callable[[], tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """`read_verified`, queued on `pool` (several files share its threads, and the caller works
    meanwhile): the header is read and the device buffer made now; the returned `wait()` gives
    (tensors, metadata) once every piece is read and verified."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n < (1 << 27) else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise refuse(f"{path} is not a safetensors file (unreadable header)")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    spans, at = [], 0  # (file start, file end, dest start), each dest start a multiple of ALIGN
    for _, info in items:
        s, e = info["data_offsets"]
        spans.append((data_start + s, data_start + e, at))
        at += -(-(e - s) // ALIGN) * ALIGN
    dest = torch.empty(max(at, 1), dtype=torch.uint8, device=device)  # every tensor is a view of this
    hashes = _start_pass(path, chunk, dest, spans, pool)

    def wait() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        got = hashes()
        if expected is not None and got != list(expected):
            raise refuse(f"{path} does not match its manifest (sha256 differs: corrupted, truncated or replaced)")
        tensors = {}
        for (name, info), (a, b, d) in zip(items, spans):
            tensors[name] = dest[d: d + b - a].view(DTYPES[info["dtype"]]).view(info["shape"])
        return tensors, meta

    return wait
