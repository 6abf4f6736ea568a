"""Streaming a module's weights piece by piece through the device during each call (memory='low').

`BlockStream` is a weight handle (load/wait/unload/resident/nbytes, as `offload.ModuleWeights`)
for a module whose forward runs `pieces` (submodules) once each, in order: T5-XXL's embedding, then
its 24 blocks. With `streaming` off it moves the whole module like `ModuleWeights`. With it on,
`load()` brings the rest (T5: the final norm) and the first piece; forward hooks then bring each
piece before it runs (already there when prefetched) and drop it after, while the next piece's copy
runs on a side stream, so at most two pieces are on the device at once: T5's 4.4 GiB of FP8 weights
need ~0.45 GiB there. The same bytes cross PCIe as for a whole-module load, once per call.

Frees are safe while the GPU still reads a piece: every device copy is allocated on the caller's
stream (the caching allocator reuses it only for later work on that stream) and a prefetch's copy
waits for the caller's stream first (offload.ModuleWeights.load). Calls are serialised by the
memory residency lock (runtime/memory.py), which holds across the component call.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from .offload import ModuleWeights, _unview


class BlockStream:
    """The weight handle of a module whose `pieces` run once each, in order, per call (see above)."""

    def __init__(self, module: nn.Module, pieces: Sequence[nn.Module], device: torch.device,
                 prefetch: bool = True) -> None:
        self.device, self.prefetch = torch.device(device), prefetch
        _unview(module)
        self.pieces = [ModuleWeights(p, self.device) for p in pieces]
        taken = frozenset(id(t) for w in self.pieces for t, _ in w.tensors)
        self.rest = ModuleWeights(module, self.device, skip=taken)
        self.tensors = self.rest.tensors + [x for w in self.pieces for x in w.tensors]
        self.nbytes = self.rest.nbytes + sum(w.nbytes for w in self.pieces)
        self.streaming = False  # memory='low' turns it on (Residency)
        self.most_pieces = 0  # most pieces on the device at once (measured at each piece's start)
        self._armed = False
        self._side: torch.cuda.Stream | None = None
        for i, p in enumerate(pieces):
            p.register_forward_pre_hook(partial(self._before, i))
            p.register_forward_hook(partial(self._after, i))

    @property
    def peak_bytes(self) -> int:
        """Weight bytes on the device at most while the module runs."""
        if not self.streaming:
            return self.nbytes
        sizes = [w.nbytes for w in self.pieces]
        pair = max((a + b for a, b in zip(sizes, sizes[1:])), default=sum(sizes)) if self.prefetch else max(sizes)
        return self.rest.nbytes + pair

    def _stream(self) -> torch.cuda.Stream | None:
        if self.device.type == "cuda" and self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def _before(self, i: int, module: nn.Module, args: tuple) -> None:
        if not (self.streaming and self._armed):
            return
        with torch.inference_mode(False):  # device copies are ordinary tensors, as load() outside a call makes them
            piece = self.pieces[i]
            if not piece.resident():
                piece.load()  # not prefetched: on the caller's stream
            piece.wait()
            nxt = self.pieces[i + 1] if i + 1 < len(self.pieces) else None
            if self.prefetch and nxt is not None and not nxt.resident():
                nxt.load(self._stream())  # overlaps this piece's compute
        self.most_pieces = max(self.most_pieces, sum(w.resident() for w in self.pieces))

    def _after(self, i: int, module: nn.Module, args: tuple, out: object) -> None:
        if self.streaming and self._armed:
            self.pieces[i].unload()

    def load(self, stream: torch.cuda.Stream | None = None) -> None:
        self.rest.load(stream)
        for w in self.pieces[:1] if self.streaming else self.pieces:
            w.load(stream)
        self._armed = True

    def wait(self) -> None:
        self.rest.wait()
        for w in self.pieces:
            w.wait()

    def unload(self) -> None:
        self._armed = False
        self.rest.unload()
        for w in self.pieces:
            w.unload()

    def resident(self) -> bool:
        return self.rest.resident() or any(w.resident() for w in self.pieces)


def t5_pieces(graph: nn.Module) -> list[nn.Module] | None:
    """T5-XXL's streamed pieces in call order (embedding, blocks) inside a models.loader.T5Graph;
    None for a module of another shape."""
    encoder = getattr(getattr(graph, "model", None), "encoder", None)
    blocks = getattr(encoder, "block", None)
    if encoder is None or not isinstance(blocks, nn.ModuleList) or not hasattr(encoder, "embed_tokens"):
        return None
    return [encoder.embed_tokens, *blocks]
