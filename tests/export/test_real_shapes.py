"""Real shapes: FP8 export of a random-weight, full-size SD3.5 Medium MMDiT (2.24 B params).

Slow (minutes, ~20 GiB peak on the CPU): `make test-slow`. Prints time and peak RSS for
BENCHMARKS.md.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import onnx
import pytest
import torch

from sd35trt.export.calibrate import DEFAULT_EXCLUDE, collect_amax, quantize_module
from sd35trt.export.onnx_export import export_graph, sample_inputs
from sd35trt.export.qdq import qdq_summary
from sd35trt.runtime.config import VARIANTS
from sd35trt.runtime.models.mmdit import MMDiT

pytest.importorskip("modelopt", reason="nvidia-modelopt (export extra) inserts the FP8 quantizers")


def random_mmdit(name: str, dtype: torch.dtype, seed: int = 0) -> MMDiT:
    """Full-size MMDiT with seeded N(0, 0.02) weights (pos_embed too), built without fp32 copies."""
    with torch.device("meta"):
        model = MMDiT(VARIANTS[name].transformer)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            p.normal_(0.0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


@pytest.mark.slow
def test_full_size_medium_fp8_export(tmp_path: Path, capsys) -> None:
    t0 = time.perf_counter()
    model = random_mmdit("sd3.5-medium", torch.bfloat16)
    config = VARIANTS["sd3.5-medium"]
    args = sample_inputs(config, "transformer", torch.bfloat16)  # 64x96 px, 16 T5 tokens

    def forward_loop(m):
        with torch.no_grad():
            m(*args)

    model = quantize_module(model, DEFAULT_EXCLUDE, forward_loop)
    amax = collect_amax(model)
    t_calib = time.perf_counter() - t0
    out = tmp_path / "transformer.onnx"
    stats = export_graph(model, "transformer", args, out, fp8=True)
    t_total = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n_linear = sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if not n.startswith(DEFAULT_EXCLUDE))
    with capsys.disabled():
        print(f"\n[sd3.5-medium FP8 export: calib {t_calib:.0f}s, total {t_total:.0f}s, peak RSS {peak_gib:.1f} GiB, "
              f"onnx {stats.bytes / 2**30:.2f} GiB, {stats.fp8_weights} FP8 weights, {stats.qdq_pairs} DQ]")
    assert stats.fp8_weights == n_linear == len(amax) // 2
    assert stats.data is not None  # beyond 2 GiB limits: external data
    summary = qdq_summary(onnx.load(str(out), load_external_data=False))
    assert len(summary["quantized_linears"]) == n_linear
