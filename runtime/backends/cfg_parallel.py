"""CFG-parallel: the two halves of the CFG batch on two processes (one GPU each), joined every step.

Under CFG the transformer sees [2B] rows, [negatives; prompts] (runtime/guidance.py). `CfgParallel`
wraps a backend so that on each of the two ranks of a `torch.distributed` group its transformer
runs only its own half (rank 0 the unconditional rows, rank 1 the conditional ones) and the two
velocity halves are all-gathered back into [2B] rows in order; every other component, the guidance
formula, the sampler and the noise are the same on both ranks (same request, same seed), so both
hold the same latents after every step and rank 0's image is the single-process one. A call with
an odd row count, or with `skip_layers` (the skip-layer pass of SLG), runs whole on each rank.

    dist.init_process_group("gloo" on a CPU / "nccl" on GPUs, ...)   # the caller's; NCCL_NVLS_ENABLE=0
    pipe.backend = CfgParallel(pipe.backend)                         # every rank, same requests

The group is the caller's (`torch.distributed.init_process_group`, 127.0.0.1 on one machine), so
this module changes nothing process-wide.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import InvalidInputError


class CfgParallelTransformer:
    """`transformer(x, t, context, pooled)` split by rows over the 2 ranks of `group`."""

    def __init__(self, transformer: Any, group: Any = None) -> None:
        if not dist.is_initialized():
            raise InvalidInputError("CfgParallel needs a torch.distributed process group; call "
                                    "torch.distributed.init_process_group first (gloo on a CPU, nccl on GPUs)")
        world = dist.get_world_size(group)
        if world != 2:
            raise InvalidInputError(f"CfgParallel splits the CFG batch in two halves; the group has {world} "
                                    f"ranks, start 2 processes")
        self.inner, self.group, self.rank = transformer, group, dist.get_rank(group)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 **kw: Any) -> torch.Tensor:
        rows = x.shape[0]
        if kw or rows % 2:
            return self.inner(x, t, context, pooled, **kw)
        half = rows // 2
        mine = slice(self.rank * half, (self.rank + 1) * half)
        v = self.inner(x[mine], t[mine], context[mine], pooled[mine]).float().contiguous()  # [B, 16, h, w]
        parts = [torch.empty_like(v) for _ in range(2)]
        dist.all_gather(parts, v, group=self.group)
        return torch.cat(parts)  # [2B, 16, h, w]: [rank 0's rows; rank 1's rows]


class CfgParallel:
    """A backend whose transformer is `CfgParallelTransformer` over `backend`'s; the rest is `backend`'s."""

    def __init__(self, backend: Any, group: Any = None) -> None:
        self._backend = backend
        self.transformer = CfgParallelTransformer(backend.transformer, group)
        self.name = f"{backend.name}+cfg-parallel"

    def __getattr__(self, name: str) -> Any:  # every other attribute of the Backend protocol
        return getattr(self._backend, name)

    def close(self) -> None:
        self._backend.close()
