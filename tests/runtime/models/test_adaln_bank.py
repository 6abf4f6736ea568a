"""The adaLN bank (models/adaln_bank.py): one GEMM for every block's adaLN projection, same outputs
as the per-block projections (bf16 and FP8 models), no second copy of the weights, undoable."""

from __future__ import annotations

import copy

import pytest
import torch

from sd35trt.runtime.backends.fp8_fusions import check_fusions, fusion_options
from sd35trt.runtime.errors import InvalidInputError
from sd35trt.runtime.models.adaln_bank import batch_adaln, unbatch_adaln
from sd35trt.runtime.models.fp8 import HIGH_PRECISION, max_calibrate, to_fp8


def _per_block(model, temb):
    return [(b.norm1(temb), b.norm1_context(temb)) for b in model.transformer_blocks]


@pytest.mark.parametrize("family", ["large", "medium"])  # medium: 9-chunk norm1 (dual attention)
@pytest.mark.parametrize("fp8", [False, True])
@torch.no_grad()
def test_bank_equals_the_per_block_projections(family: str, fp8: bool, tiny_mmdit) -> None:
    model, args = tiny_mmdit(family)
    if fp8:
        amax = max_calibrate(model, lambda m: m(*args), HIGH_PRECISION)
        model = to_fp8(model, amax, fast_accum=True)
    temb = model.time_text_embed(args[1], args[3])  # [B, D]
    ref, ref_out = _per_block(model, temb), model(*args)
    batched = copy.deepcopy(model)
    bank = batch_adaln(batched)
    got = bank(temb)
    assert len(got) == len(ref) and [len(g[0]) for g in got] == [len(r[0]) for r in ref]
    worst = 0.0
    for (g1, gc), (r1, rc) in zip(got, ref):
        for g, r in zip(g1 + gc, r1 + rc):
            assert g.shape == r.shape and g.dtype == r.dtype == torch.bfloat16
            worst = max(worst, float(((g.float() - r.float()).abs() / r.float().abs().clamp_min(1e-2)).max()))
    # bf16: one GEMM over the concatenated weights; FP8: the scales applied as two fp32 multiplies
    # instead of cuBLAS's one alpha. Seen bit-equal (0) on the CPU in all four cases; on the H200
    # (tools/step_fusions.py, 6 Large blocks, FP8) 6e-6 relative; the bound 2^-7 = 2 bf16 ulps
    print(f"[adaln bank {family} fp8={fp8}: worst rel diff {worst:.3g}]")
    assert worst <= 2 ** -7, worst
    out = batched(*args)
    cos = float(torch.nn.functional.cosine_similarity(out.flatten().double(), ref_out.flatten().double(), dim=0))
    assert cos > 0.9999, cos
    # the per-layer weights are views of the bank's (one copy), and the unbatched forward still runs
    name = "weight_t" if fp8 else "weight"
    lin = batched.transformer_blocks[0].norm1.linear
    assert getattr(lin, name).untyped_storage().data_ptr() == bank.weight.untyped_storage().data_ptr()
    unbatch_adaln(batched)
    assert not hasattr(batched, "adaln_bank")
    assert torch.equal(batched(*args), ref_out)


def test_fp8_bank_refuses_different_input_scales(tiny_mmdit) -> None:
    model, args = tiny_mmdit("large")
    amax = max_calibrate(model, lambda m: m(*args), HIGH_PRECISION)
    amax["transformer_blocks.1.norm1.linear.input_quantizer"] *= 2
    model = to_fp8(model, amax)
    with pytest.raises(ValueError, match="input scales differ"):
        batch_adaln(model)


def test_fusion_names_are_checked() -> None:
    assert fusion_options(("adaln-bank", "combo")) == {"combo_kernels": True}
    assert fusion_options(()) == {}
    with pytest.raises(InvalidInputError, match="nope"):
        check_fusions(("nope",))
    with pytest.raises(InvalidInputError, match="tuple"):
        check_fusions("combo")
