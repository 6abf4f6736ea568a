"""The MMDiT's attention core, chosen once at load: FlashAttention-4 on Hopper/Blackwell, SDPA otherwise.

Every core maps (q, k, v) [B, N, heads, D] -> softmax(q k^T / sqrt(D)) v [B, N, heads, D], the
layout the MMDiT makes them in. FlashAttention-4 (`flash_attn.cute.flash_attn_func`, package
`flash-attn-4`, CuTe DSL; `pip install 'sd35trt[hopper]'`) takes that layout as it is, so no
transpose is paid; torch's SDPA wants heads first (`mmdit.sdpa` transposes as views).

FA4 runs behind the custom op `torch.ops.sd35trt.flash_attn4`, registered on first use (nothing
happens at import): torch.compile sees one opaque node with a fake (shape-only) implementation,
so `fullgraph=True` and CUDA-graph replay hold. The op's CPU kernel is the reference (fp32 math),
which is what the CPU tests check the op's schema and fake against.

On sm90 FA4 is BF16/FP16 only (its FP8 path is SM100-only), which is what the MMDiT runs.
"""

from __future__ import annotations

import importlib

import math
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

FA4_MAJORS = (9, 10)  # sm90 (Hopper), sm100/sm103 (Blackwell datacenter): FA4's warp-specialized kernels
FA4_DTYPES = (torch.bfloat16, torch.float16)
OP_NAME = "sd35trt::flash_attn4"
INSTALL_HINT = "pip install 'sd35trt[hopper]' (flash-attn-4 with nvidia-cutlass-dsl)"

_lock = threading.Lock()
_op = None


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in fp32 on [B, N, H, D] tensors; returns q's dtype."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
    s = qf @ kf.transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, Nq, Nk]
    out = torch.softmax(s, dim=-1) @ vf  # [B, H, Nq, D]
    return out.transpose(1, 2).contiguous().to(q.dtype)  # [B, Nq, H, D]


def _fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v)[0]  # (out, lse): out [B, N, H, D], lse None without return_lse
    return out


def flash_attn4_op():
    """The custom op `sd35trt::flash_attn4` (registered once, thread-safe): CUDA -> FA4, CPU -> the
    fp32 reference, fake -> a contiguous tensor of q's shape and dtype."""
    global _op
    with _lock:
        if _op is not None:
            return _op
        existing = getattr(getattr(torch.ops, "sd35trt", None), "flash_attn4", None)
        if existing is not None:  # registered by another copy of this module (reloaded in a test)
            _op = existing
            return _op

        @torch.library.custom_op(OP_NAME, mutates_args=(), device_types="cuda")
        def flash_attn4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """q, k, v [B, N, H, D] bf16/fp16 -> softmax(q k^T / sqrt(D)) v [B, N, H, D]."""
            return _fa4_forward(q, k, v)

        @flash_attn4.register_fake
        def _(q, k, v):
            return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, N, H, D] contiguous

        @flash_attn4.register_kernel("cpu")
        def _(q, k, v):
            return reference_attention(q, k, v)

        _op = flash_attn4
        return _op


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The FA4 core: (q, k, v) [B, N, H, D] -> [B, N, H, D] through `torch.ops.sd35trt.flash_attn4`
    (call `flash_attn4_op()` once first; `choose_attention` does)."""
    return torch.ops.sd35trt.flash_attn4(q, k, v)


def import_error(module: str, label: str | None = None) -> str | None:
    """None when `module` imports here, else why not in one line ("<label> does not import (…)")."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a CuTe DSL / CUDA library failure at import
        first = (str(exc).splitlines() or [""])[0][:200]
        return f"{label or module} does not import ({type(exc).__name__}: {first})"
    return None


def fa4_import_error() -> str | None:
    """None when `flash_attn.cute` imports here, else why not (the exception, in one line)."""
    return import_error("flash_attn.cute")


def _cudnn_context() -> ContextManager:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION])


@dataclass(frozen=True)
class AttentionChoice:
    """What runs the MMDiT's attention: `name`, the `core` to install, the `context` the model runs
    under (the SDPA backend choice; nothing for FA4) and `reason` (why FA4 was not chosen, or '')."""

    name: str
    core: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    context: Callable[[], ContextManager]
    reason: str = ""


def select_attention(device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype,
                     fa4_error: str | None) -> AttentionChoice:
    """The decision alone, from facts: device type, CUDA capability (None off CUDA), the model's
    dtype, and `fa4_error` (None when flash_attn.cute imports, else why not)."""
    from .mmdit import sdpa

    if device_type != "cuda":
        return AttentionChoice("sdpa", sdpa, nullcontext, f"device {device_type}: FA4 needs CUDA")
    cudnn = lambda reason: AttentionChoice("sdpa-cudnn", sdpa, _cudnn_context, reason)  # noqa: E731
    sm = f"sm{capability[0]}{capability[1]}" if capability else "sm?"
    if dtype not in FA4_DTYPES:  # cuDNN and flash SDPA take bf16/fp16 only: torch picks (efficient / math)
        return AttentionChoice("sdpa", sdpa, nullcontext, f"dtype {dtype}: FA4, cuDNN and flash SDPA take bf16/fp16")
    if capability is None or capability[0] not in FA4_MAJORS:
        return cudnn(f"{sm}: FA4 is used on sm90/sm100 only")
    if fa4_error is not None:
        return cudnn(f"{sm}: {fa4_error}; {INSTALL_HINT}")
    return AttentionChoice("flash-attn-4", flash_attention, nullcontext)


def choose_attention(device: torch.device | str, dtype: torch.dtype) -> AttentionChoice:
    """FA4 where the device is sm90/sm100, the dtype bf16/fp16 and `flash_attn.cute` imports (the op
    is registered then); cuDNN SDPA on other GPUs; plain SDPA off CUDA."""
    device = torch.device(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    needs_probe = device.type == "cuda" and capability[0] in FA4_MAJORS and dtype in FA4_DTYPES
    choice = select_attention(device.type, capability, dtype, fa4_import_error() if needs_probe else None)
    if choice.core is flash_attention:
        flash_attn4_op()
    return choice


def set_attention_core(model: nn.Module, core: Callable) -> int:
    """Give every MMDiT attention of `model` this core, in place; returns how many were set."""
    count = 0
    for mod in model.modules():
        if hasattr(mod, "core") and hasattr(mod, "heads"):
            mod.core = core
            count += 1
    return count

