"""T5 with real FP8 GEMMs (runtime/models/fp8_text.py) on the tiny checkpoint's T5, on the CPU."""

from __future__ import annotations

from pathlib import Path

import torch

from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.models.fp8 import FP8WeightLinear
from sd35trt.runtime.models.fp8_text import FP8TextLinear, calibrate_linears, t5_to_fp8
from sd35trt.runtime.models.loader import load_modules


def test_t5_fp8_gemms_keep_wo_high_precision_and_track_bf16(tiny_models: dict[str, Path]) -> None:
    ckpt = Checkpoint.open(tiny_models["medium"])
    t5 = load_modules(ckpt, ["t5"], torch.device("cpu"), torch.bfloat16)["t5"]
    g = torch.Generator().manual_seed(0)
    vocab = t5.model.config.vocab_size
    calib = [torch.randint(0, vocab, (2, 32), generator=g) for _ in range(4)]  # [2, T] ids
    held = torch.randint(0, vocab, (2, 32), generator=g)
    with torch.no_grad():
        ref = t5(held).double()
        amax = calibrate_linears(t5.model, calib)
        t5_to_fp8(t5.model, amax)
        got = t5(held).double()
    kinds = {n.rsplit(".", 1)[-1]: type(m) for n, m in t5.model.named_modules() if isinstance(m, (FP8TextLinear, FP8WeightLinear))}
    assert kinds["wo"] is FP8WeightLinear and kinds["q"] is FP8TextLinear and kinds["wi_0"] is FP8TextLinear
    cos = float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0))
    assert 0.99 <= cos < 1.0, cos
