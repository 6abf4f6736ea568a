"""Moving one torch module's weights between a host copy and the compute device.

`ModuleWeights` keeps a master copy of every parameter and buffer of a module on the host (pinned
when the compute device is a GPU, so copies are asynchronous DMA) and swaps each tensor's `.data`
between that master and a device copy. Weights are never written at run time, so sending a module
back is only dropping its device copies: nothing is copied back. Loading allocates on the caller's
stream and copies on `stream` (a side stream overlaps the copy with the caller's work; `wait()`
makes the caller's stream wait for it before the weights are used).

On a CPU compute device the "device copy" is a fresh clone of the master, so residency stays a
real, checkable property (which storage each tensor points at) on machines without a GPU.
"""

from __future__ import annotations

import torch
from torch import nn


class ModuleWeights:
    def __init__(self, module: nn.Module, device: torch.device, skip: frozenset[int] = frozenset()) -> None:
        """`skip`: ids of tensors another handle moves (models/streaming.py: the streamed pieces)."""
        self.device = torch.device(device)
        _unview(module)
        seen, tensors = set(skip), []
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) not in seen:  # tied weights (T5's shared embedding) move once
                seen.add(id(t))
                tensors.append(t)
        pin = self.device.type == "cuda"
        self.tensors = [(t, self._master(t, pin)) for t in tensors]
        for t, master in self.tensors:
            t.data = master  # starts on the host: the device copies are dropped
        self.nbytes = sum(m.numel() * m.element_size() for _, m in self.tensors)
        self._event: torch.cuda.Event | None = None

    @staticmethod
    def _master(t: torch.Tensor, pin: bool) -> torch.Tensor:
        if not pin:
            return t.detach().cpu()  # the tensor itself when it is on the CPU already
        master = torch.empty_like(t, device="cpu", pin_memory=True)  # same strides (FP8 weight_t is column-major)
        master.copy_(t.detach())
        return master

    def load(self, stream: torch.cuda.Stream | None = None) -> None:
        """Device copies of every tensor; with a side `stream`, asynchronous until `wait()`."""
        self.wait()  # a copy still in flight must land before its memory can be dropped
        copies = [(t, torch.empty_like(m, device=self.device), m) for t, m in self.tensors]
        if self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            side = stream or current
            side.wait_stream(current)  # the new blocks may reuse memory the caller's stream still reads
            with torch.cuda.stream(side):
                for _, dst, m in copies:
                    dst.copy_(m, non_blocking=True)
            self._event = side.record_event() if side is not current else None
        else:
            for _, dst, m in copies:
                dst.copy_(m)
        for t, dst, _ in copies:
            t.data = dst

    def wait(self) -> None:
        """The caller's stream waits for an asynchronous load."""
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
            self._event = None

    def unload(self) -> None:
        """Point every tensor back at its host master (the device copies are freed)."""
        self.wait()
        for t, m in self.tensors:
            t.data = m

    def resident(self) -> bool:
        """Whether any (non-empty) tensor of the module lives in a device copy now. Device types are
        compared, not devices: a copy made for `cuda` lives on `cuda:0`, and torch says they differ."""
        return any(t.numel() and t.data_ptr() != m.data_ptr() and t.device.type == self.device.type
                   for t, m in self.tensors)


def _unview(module: nn.Module) -> None:
    """Re-register every parameter or buffer that is a view (FP8Linear's `weight_t = w.t()`) as a
    tensor of its own on the same storage: a view keeps its base alive through `_base`, so swapping
    its `.data` would never free the base's device memory."""
    done: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                if t is None or not t._is_view():
                    continue
                if id(t) not in done:
                    own = t.detach()  # same storage and strides, not a view (no `_base`)
                    done[id(t)] = nn.Parameter(own, requires_grad=False) if isinstance(t, nn.Parameter) else own
                table[key] = done[id(t)]
