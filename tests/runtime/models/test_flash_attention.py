"""The attention core choice (FA4 / cuDNN SDPA / SDPA) and the `sd35trt::flash_attn4` custom op.

On CPU the op runs its fp32 reference kernel: these tests check the op's registration (schema,
fake, torch.compile fullgraph) and the selection logic. The GPU test (`pytest -m gpu` on the device
machine, with `sd35trt[hopper]` installed) checks FA4 itself against SDPA math at SD3.5 shapes.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sd35trt.export.tiny_model import TINY_TRANSFORMERS
from sd35trt.runtime.models.flash_attention import (INSTALL_HINT, choose_attention, fa4_import_error,
                                                    flash_attention, flash_attn4_op, reference_attention,
                                                    select_attention, set_attention_core)
from sd35trt.runtime.models.mmdit import MMDiT, sdpa


def _qkv(b=2, n=150, h=3, d=64, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g) for _ in range(3))  # [B, N, H, D]
    return tuple(t.to(device, dtype) for t in (q, k, v))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def test_reference_equals_sdpa_in_float64() -> None:
    q, k, v = (t.double() for t in _qkv(n=77, h=2, d=32, seed=1))
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = reference_attention(q, k, v)
    assert out.shape == q.shape and out.is_contiguous()
    assert _rel(out, ref) < 1e-6  # the fp32 reference: far under bf16 error, not bit-equal to float64
    assert _rel(out, ref) > 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_passes_opcheck_and_equals_the_reference(dtype: torch.dtype) -> None:
    op = flash_attn4_op()
    assert flash_attn4_op() is op  # registered once
    q, k, v = _qkv(n=90, dtype=dtype, seed=2)
    torch.library.opcheck(op, (q, k, v))  # schema, fake tensor, aot dispatch
    out = flash_attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(out, reference_attention(q, k, v))


def test_op_compiles_fullgraph_through_its_fake() -> None:
    flash_attn4_op()
    q, k, v = _qkv(n=40, seed=3)
    calls = []

    def f(q, k, v):
        return flash_attention(q * 2.0, k, v) + 1.0

    def backend(gm, inputs):  # see the graph dynamo made: one op node, nothing broken out
        calls.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    out = torch.compile(f, fullgraph=True, backend=backend)(q, k, v)
    assert torch.equal(out, f(q, k, v))
    assert len(calls) == 1 and any("flash_attn4" in str(t) for t in calls[0])


def test_importing_the_module_registers_nothing() -> None:
    code = ("import torch, sd35trt.runtime.models.flash_attention as fa\n"
            "print(hasattr(torch.ops.sd35trt, 'flash_attn4'))\n"
            "fa.flash_attn4_op()\n"
            "print(hasattr(torch.ops.sd35trt, 'flash_attn4'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_selection_from_facts() -> None:
    bf16 = torch.bfloat16
    cpu = select_attention("cpu", None, bf16, None)
    assert cpu.name == "sdpa" and cpu.core is sdpa and "cpu" in cpu.reason
    ampere = select_attention("cuda", (8, 0), bf16, None)
    assert ampere.name == "sdpa-cudnn" and ampere.core is sdpa and "sm80" in ampere.reason
    ada = select_attention("cuda", (8, 9), bf16, None)
    assert ada.name == "sdpa-cudnn" and "sm89" in ada.reason
    missing = select_attention("cuda", (9, 0), bf16, "flash_attn.cute does not import (ModuleNotFoundError: x)")
    assert missing.name == "sdpa-cudnn" and "ModuleNotFoundError" in missing.reason and INSTALL_HINT in missing.reason
    for cap in ((8, 0), (9, 0)):  # cuDNN / flash SDPA have no fp32 kernel: the fp32 model must not be restricted
        fp32 = select_attention("cuda", cap, torch.float32, None)
        assert fp32.name == "sdpa" and fp32.core is sdpa and "float32" in fp32.reason
        with fp32.context():
            assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    for cap in ((9, 0), (10, 0)):
        fa4 = select_attention("cuda", cap, bf16, None)
        assert fa4.name == "flash-attn-4" and fa4.core is flash_attention and fa4.reason == ""
    with fa4.context(), cpu.context():  # both are context-manager factories
        pass


def test_cudnn_choice_restricts_sdpa_to_cudnn_and_flash() -> None:
    be = torch.backends.cuda
    with select_attention("cuda", (8, 0), torch.bfloat16, None).context():
        assert be.cudnn_sdp_enabled() and be.flash_sdp_enabled()
        assert not be.math_sdp_enabled() and not be.mem_efficient_sdp_enabled()
    assert be.math_sdp_enabled()  # restored on exit: no process-wide change


def test_import_probe_reports_why() -> None:
    err = fa4_import_error()
    if importlib.util.find_spec("flash_attn") is None:
        assert err is not None and "flash_attn" in err and "ModuleNotFoundError" in err
    else:  # installed here (sd35trt[hopper]): the probe must agree with a real import
        try:
            import flash_attn.cute  # noqa: F401
        except Exception:
            assert err is not None
        else:
            assert err is None


def test_choose_on_cpu_is_sdpa() -> None:
    choice = choose_attention("cpu", torch.bfloat16)
    assert choice.name == "sdpa" and choice.core is sdpa


@pytest.mark.parametrize("family", ["large", "medium"])
def test_mmdit_with_the_op_core_equals_sdpa(family: str) -> None:
    flash_attn4_op()
    torch.manual_seed(0)
    model = MMDiT(TINY_TRANSFORMERS[family]).eval()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 16, 16, 16, generator=g), torch.tensor([900.0, 300.0]),
            torch.randn(2, 77 + 24, 96, generator=g), torch.randn(2, 80, generator=g))
    with torch.no_grad():
        ref = model(*args)
        n = set_attention_core(model, flash_attention)
        out = model(*args)
        set_attention_core(model, sdpa)
        back = model(*args)
    assert n == sum(hasattr(m, "heads") and hasattr(m, "core") for m in model.modules()) > 0
    assert torch.equal(back, ref)
    assert _rel(out, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention-4 needs a CUDA GPU (sm90/sm100)")
@pytest.mark.parametrize("heads", [38, 24])  # SD3.5 Large, Medium; 1024²: 4096 image + 333 text tokens
def test_fa4_matches_sdpa_math_at_sd35_shapes(heads: int) -> None:
    choice = choose_attention("cuda", torch.bfloat16)
    if choice.name != "flash-attn-4":
        pytest.skip(f"FA4 not chosen on this machine: {choice.reason}")
    q, k, v = _qkv(b=2, n=4096 + 333, h=heads, d=64, dtype=torch.bfloat16, seed=4, device="cuda")
    q, k = q * math.sqrt(3.0), k  # logits std ~ sqrt(3): a peaked softmax, as trained models have
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        exact = sdpa(q.float(), k.float(), v.float())  # fp32 math: the reference
        math_bf16 = sdpa(q, k, v)
    out = flash_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert _rel(out, exact) < 1e-2 and _rel(out, exact) <= 1.5 * _rel(math_bf16, exact) + 1e-3
    graphed = torch.compile(lambda a, b, c: flash_attention(a, b, c), fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        again = graphed(q, k, v)
    assert torch.equal(again, out)
