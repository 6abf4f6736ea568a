"""The FP8 GEMM choice (models/fp8_gemm.py): the decision from facts, and the quack glue — custom ops,
the fused FF1 + GELU + quantize FeedForward, the cuBLAS fallback below one tile of rows — checked
on the CPU through the ops' CPU kernels (the same math through `_scaled_mm`) against the cuBLAS
path; undoing it restores the cuBLAS model bit for bit. The quack kernels themselves run in the
GPU test at the end (`pytest -m gpu`, sm90 with quack installed)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sd35trt.runtime.errors import InvalidInputError
from sd35trt.runtime.models.fp8 import HIGH_PRECISION, FP8Linear, max_calibrate, to_fp8
from sd35trt.runtime.models.fp8_gemm import (MIN_M, QuackFeedForward, check_gemm, choose_gemm, select_gemm,
                                             use_quack)
from sd35trt.runtime.models.mmdit import FeedForward, use_sigmoid_gelu


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_the_choice_from_facts() -> None:
    assert select_gemm("cuda", (9, 0), None) .name == "quack"
    cpu = select_gemm("cpu", None, None)
    assert cpu.name == "cublas" and "sm90" in cpu.reason
    ada = select_gemm("cuda", (8, 9), None)
    assert ada.name == "cublas" and "sm89" in ada.reason
    missing = select_gemm("cuda", (9, 0), "quack does not import (ModuleNotFoundError: quack)")
    assert missing.name == "cublas" and "sd35trt[hopper]" in missing.reason and "ModuleNotFoundError" in missing.reason
    assert select_gemm("cuda", (9, 0), None, "cublas").name == "cublas"
    with pytest.raises(InvalidInputError, match="gemm='quack' cannot run here.*sm89"):
        select_gemm("cuda", (8, 9), None, "quack")
    with pytest.raises(InvalidInputError, match="gemm='fast'.*'auto'"):
        check_gemm("fast")
    assert choose_gemm("cpu").name == "cublas"


def test_the_ops_pass_opcheck_on_the_cpu() -> None:
    """Schema, fake (meta) kernels and the CPU kernels agree (what torch.compile relies on)."""
    from sd35trt.runtime.models.fp8_gemm import register_ops

    register_ops()
    g = torch.Generator().manual_seed(0)
    xq = (torch.randn(160, 64, generator=g) * 50).to(torch.float8_e4m3fn)  # [M, K]
    w = (torch.randn(96, 64, generator=g) * 50).to(torch.float8_e4m3fn)  # [N, K]
    alpha, bias, inv = torch.tensor(1e-4), torch.randn(1, 96, generator=g), torch.tensor(3.0)
    # E4M3 tensors: opcheck's schema (mutation) check compares them with a multiply the CPU lacks
    # for fp8, so the fake-tensor and AOT-dispatch checks (what torch.compile uses) run
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.sd35trt.quack_fp8_gemm, (xq, w, alpha, bias), test_utils=checks)
    torch.library.opcheck(torch.ops.sd35trt.quack_fp8_gemm_gelu_q, (xq, w, alpha, bias, inv), test_utils=checks)
    y = torch.ops.sd35trt.quack_fp8_gemm(xq, w, alpha, bias)
    ref = (xq.float() @ w.float().t()) * alpha + bias
    assert y.dtype == torch.bfloat16 and y.shape == (160, 96)
    assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2)
    q = torch.ops.sd35trt.quack_fp8_gemm_gelu_q(xq, w, alpha, bias, inv)
    want = (torch.nn.functional.gelu(y.float(), approximate="tanh") * 3.0).clamp(-448, 448)
    assert q.dtype == torch.float8_e4m3fn and torch.allclose(q.float(), want, rtol=0.07, atol=0.02)


def _fp8_model(tiny_mmdit, family: str = "large"):
    """The tiny FP8 MMDiT as torch-fp8 builds it (image stream 2 x 64 = 128 rows = MIN_M: quack;
    context 24 rows: cuBLAS) and one step's inputs."""
    model, args = tiny_mmdit(family)  # conftest.py
    amax = max_calibrate(model, lambda m: m(*args), HIGH_PRECISION)
    model = to_fp8(model, amax, fast_accum=True)
    use_sigmoid_gelu(model)
    return model, args


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


@pytest.mark.parametrize("family", ["large", "medium"])
@torch.no_grad()
def test_quack_glue_matches_the_cublas_path_and_undoes(family: str, tiny_mmdit) -> None:
    model, args = _fp8_model(tiny_mmdit, family)
    ref = model(*args)
    fused = copy.deepcopy(model)
    layers = use_quack(fused)
    assert layers == sum(type(m) is FP8Linear for m in model.modules()) > 0
    ffs = [m for m in fused.modules() if isinstance(m, FeedForward)]
    assert ffs and all(type(m) is QuackFeedForward for m in ffs)
    counter = OpCounter()
    with counter:
        got = fused(*args)
    blocks = len(fused.transformer_blocks)
    # image stream: 128 rows (>= MIN_M) -> quack; context stream (24 rows) and adaLN (2) -> cuBLAS
    assert MIN_M == 128
    assert counter.calls.get("sd35trt.quack_fp8_gemm_gelu_q", 0) == blocks, counter.calls
    assert counter.calls.get("sd35trt.quack_fp8_gemm", 0) >= 3 * blocks, counter.calls  # qkv, out, ff2 each block
    assert counter.calls.get("aten._scaled_mm", 0) > 0  # what stayed on cuBLAS
    cos = _cos(got, ref)
    print(f"[{family}: quack glue vs cuBLAS path, velocity cosine {cos:.6f}]")
    # the fused FF1 skips one bf16 rounding of the GELU output before E4M3, so not bit-equal
    assert cos >= 0.999, cos
    assert not torch.equal(got, ref)  # the fused path ran (it rounds differently)
    assert use_quack(fused, enabled=False) == layers
    assert all(type(m) is FeedForward for m in fused.modules() if isinstance(m, FeedForward))
    assert torch.equal(fused(*args), ref)
    assert fused.state_dict().keys() == model.state_dict().keys()  # the epilogue buffers are not saved


@pytest.mark.gpu
@torch.no_grad()
def test_quack_kernels_on_sm90(tiny_mmdit) -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs an sm90 GPU (the quack FP8 GEMM is configured for sm90)")
    choice = choose_gemm("cuda")
    if choice.name != "quack":
        pytest.skip(f"quack does not run here: {choice.reason}")
    model, args = _fp8_model(tiny_mmdit, "large")
    model, args = model.cuda(), tuple(a.cuda() for a in args)
    ref = model(*args)
    use_quack(model)
    got = model(*args)
    assert _cos(got, ref) >= 0.999
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        out = compiled(*args)
    assert _cos(out, got) >= 0.9999
    from sd35trt.runtime.models.fp8_gemm import fuse_qk_norm, join_qkv

    long = (args[0], args[1], args[2].repeat(1, 6, 1), args[3])  # 2 x 72 context rows: >= MIN_M, quack's
    plain = model(*long)
    assert join_qkv(model) > 0  # both QKV GEMMs into one buffer (D: row slices of it)
    assert _cos(model(*long), plain) >= 0.9999
    use_quack(model)
    assert fuse_qk_norm(model) > 0  # the q/k RMS-norm in the QKV epilogue (quack's HeadRstd prepass)
    assert _cos(model(*args), got) >= 0.9999


@pytest.mark.parametrize("family", ["large", "medium"])  # medium: the image-only attn2 of its first blocks too
@torch.no_grad()
def test_qk_norm_fusion_matches_the_norms_and_undoes(family: str, tiny_mmdit) -> None:
    """Fusion `quack-qknorm`: each fused q/k/v projection RMS-norms q and k in its GEMM (the op's
    CPU kernel here; below MIN_M rows, the same math after cuBLAS); the attention's norms become
    Identity. Against the quack model with the norms in place: velocity cosine >= 0.9999; undone,
    bit-equal to it again, norms and state dict back."""
    from sd35trt.runtime.backends.fp8_fusions import apply_fusions
    from sd35trt.runtime.models.fp8_gemm import fuse_qk_norm, unfuse_qk_norm
    from sd35trt.runtime.models.mmdit import Attention, RMSNorm

    model, args = _fp8_model(tiny_mmdit, family)
    with pytest.raises(InvalidInputError, match="quack-qknorm.*cuBLAS"):
        apply_fusions(model, ("quack-qknorm",))  # cuBLAS model: refused, nothing changed
    use_quack(model)
    ref = model(*args)
    keys = model.state_dict().keys()
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    projections = sum(hasattr(a, "to_qkv") + hasattr(a, "add_qkv") for a in attns)
    assert fuse_qk_norm(model) == projections > 0
    assert all(not isinstance(getattr(a, "norm_q"), RMSNorm) for a in attns)
    counter = OpCounter()
    with counter:
        got = model(*args)
    image_qkv = sum(hasattr(a, "to_qkv") for a in attns)  # 128 image rows: the op; context (24): the fallback
    assert counter.calls.get("sd35trt.quack_fp8_gemm_qknorm", 0) == image_qkv, counter.calls
    cos = _cos(got, ref)
    print(f"[{family}: q/k norm in the QKV epilogue vs separate, velocity cosine {cos:.6f}]")
    assert cos >= 0.9999, cos
    assert unfuse_qk_norm(model) == projections
    assert all(isinstance(getattr(a, "norm_q"), RMSNorm) for a in attns)
    assert model.state_dict().keys() == keys and torch.equal(model(*args), ref)
    fuse_qk_norm(model)
    use_quack(model, enabled=False)  # turning quack off undoes the fusion first
    assert all(isinstance(getattr(a, "norm_q"), RMSNorm) for a in attns)


def test_qk_norm_op_passes_opcheck() -> None:
    from sd35trt.runtime.models.fp8_gemm import qk_norm_ref, register_ops

    register_ops()
    g = torch.Generator().manual_seed(1)
    xq = (torch.randn(160, 64, generator=g) * 50).to(torch.float8_e4m3fn)  # [M, K]
    w = (torch.randn(96, 64, generator=g) * 50).to(torch.float8_e4m3fn)  # [3D, K]: D = 32, 2 heads of 16
    alpha, bias = torch.tensor(1e-4), torch.randn(1, 96, generator=g)
    qk_w = torch.cat([torch.rand(64, generator=g) + 0.5, torch.zeros(32)])[None]
    v_one = torch.cat([torch.zeros(64), torch.ones(32)])[None]
    args = (xq, w, alpha, bias, qk_w, v_one, 16)
    torch.library.opcheck(torch.ops.sd35trt.quack_fp8_gemm_qknorm, args,
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
    y = torch.ops.sd35trt.quack_fp8_gemm(xq, w, alpha, bias).float()  # [M, 3D]
    got = torch.ops.sd35trt.quack_fp8_gemm_qknorm(*args).float()
    assert torch.equal(got[:, 64:], y[:, 64:].bfloat16().float())  # v untouched
    q = y[:, :16]
    want = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * qk_w[0, :16]
    assert torch.allclose(got[:, :16], want, rtol=1e-2, atol=1e-2)
    assert torch.equal(qk_norm_ref(y.bfloat16(), qk_w, v_one, 16), got.bfloat16())


@pytest.mark.parametrize("family", ["large", "medium"])  # medium: its image-only attn2 keeps the plain path
@torch.no_grad()
def test_joint_qkv_writes_one_buffer_and_matches_the_separate_projections(family: str, tiny_mmdit) -> None:
    """Fusion `quack-joint`: each joint attention's two QKV projections go through one op into one
    [B, N_img + N_ctx, 3D] buffer (the op's CPU kernel here), v a view of it; the step equals the
    quack model's with the cat; use_quack undoes it; a cuBLAS model is refused."""
    from sd35trt.runtime.backends.fp8_fusions import apply_fusions
    from sd35trt.runtime.models.fp8_gemm import QuackAttention, join_qkv
    from sd35trt.runtime.models.mmdit import Attention

    model, (lat, t, ctx, pooled) = tiny_mmdit(family)
    g = torch.Generator().manual_seed(3)
    ctx = torch.randn(2, MIN_M // 2, ctx.shape[-1], generator=g).bfloat16()  # [2, 64, joint]: 128 rows, quack's
    args = (lat, t, ctx, pooled)
    model = to_fp8(model, max_calibrate(model, lambda m: m(*args), HIGH_PRECISION), fast_accum=True)
    with pytest.raises(InvalidInputError, match="'quack-joint'.*cuBLAS"):
        apply_fusions(model, ("quack-joint",))
    use_quack(model)
    ref = model(*args)
    joint = sum(hasattr(m, "add_qkv") for m in model.modules() if isinstance(m, Attention))
    assert join_qkv(model) == joint > 0
    counter = OpCounter()
    with counter:
        got = model(*args)
    assert counter.calls.get("sd35trt.quack_fp8_joint_qkv", 0) == joint, counter.calls
    assert torch.equal(got, ref)
    use_quack(model)  # turns them back into Attention
    assert not any(type(m) is QuackAttention for m in model.modules())
    assert torch.equal(model(*args), ref)


def test_joint_qkv_op_passes_opcheck_and_places_the_rows() -> None:
    from sd35trt.runtime.models.fp8_gemm import register_ops

    register_ops()
    g = torch.Generator().manual_seed(2)
    e4m3 = torch.float8_e4m3fn
    xq = (torch.randn(2 * 5, 32, generator=g) * 50).to(e4m3)  # [B * n_img, K]
    cq = (torch.randn(2 * 3 + 2, 32, generator=g) * 50).to(e4m3)  # [B * n_ctx + padding, K]
    w, cw = ((torch.randn(48, 32, generator=g) * 50).to(e4m3) for _ in range(2))  # [3D, K]
    a, ca = torch.tensor(1e-4), torch.tensor(2e-4)
    bias, cbias = torch.randn(1, 48, generator=g), torch.randn(1, 48, generator=g)
    args = (xq, w, a, bias, cq, cw, ca, cbias, 2, 5, 3)
    torch.library.opcheck(torch.ops.sd35trt.quack_fp8_joint_qkv, args,
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
    out = torch.ops.sd35trt.quack_fp8_joint_qkv(*args)  # [2, 8, 48]
    img = torch.ops.sd35trt.quack_fp8_gemm(xq, w, a, bias).view(2, 5, 48)
    txt = torch.ops.sd35trt.quack_fp8_gemm(cq, cw, ca, cbias)[:6].view(2, 3, 48)
    assert out.shape == (2, 8, 48) and torch.equal(out, torch.cat([img, txt], 1))
