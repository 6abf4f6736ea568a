"""Real shapes: FP8 export of a random-weight, full-size SD3.5 Medium MMDiT (2.24 B params), and its
TensorRT-RTX engine build on the CPU.

Slow (minutes, ~20 GiB peak on the CPU): `make test-slow`. Prints time and peak RSS for
BENCHMARKS.md.
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch

from sd35trt.export.calibrate import DEFAULT_EXCLUDE, collect_amax, quantize_module
from sd35trt.export.onnx_export import export_graph
from sd35trt.export.qdq import qdq_summary
from sd35trt.runtime.components import component
from sd35trt.runtime.config import VARIANTS
from sd35trt.bench import random_mmdit as bench_random_mmdit
from sd35trt.runtime.models.mmdit import MMDiT

pytest.importorskip("modelopt", reason="nvidia-modelopt (export extra) inserts the FP8 quantizers")


def random_mmdit(name: str, dtype: torch.dtype, seed: int = 0) -> MMDiT:
    """Full-size MMDiT with seeded N(0, 0.02) weights (pos_embed too), built without fp32 copies."""
    return bench_random_mmdit(VARIANTS[name], dtype, "cpu", seed)


@pytest.fixture(scope="module")
def medium_fp8_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """FP8-calibrated full-size Medium MMDiT exported to ONNX once for this module's tests."""
    t0 = time.perf_counter()
    model = random_mmdit("sd3.5-medium", torch.bfloat16)
    args = component("transformer").sample_inputs(VARIANTS["sd3.5-medium"], torch.bfloat16)  # 64x96 px, 16 T5 tokens

    def forward_loop(m):
        with torch.no_grad():
            m(*args)

    model = quantize_module(model, DEFAULT_EXCLUDE, forward_loop)
    amax = collect_amax(model)
    t_calib = time.perf_counter() - t0
    out = tmp_path_factory.mktemp("medium") / "transformer.onnx"
    stats = export_graph(model, "transformer", args, out, fp8=True)
    n_linear = sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if not n.startswith(DEFAULT_EXCLUDE))
    del model, args
    gc.collect()
    return {"path": out, "stats": stats, "n_linear": n_linear, "n_amax": len(amax), "calib_s": t_calib,
            "total_s": time.perf_counter() - t0, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


@pytest.mark.slow
def test_full_size_medium_fp8_export(medium_fp8_onnx: dict, capsys) -> None:
    r, stats = medium_fp8_onnx, medium_fp8_onnx["stats"]
    with capsys.disabled():
        print(f"\n[sd3.5-medium FP8 export: calib {r['calib_s']:.0f}s, total {r['total_s']:.0f}s, peak RSS "
              f"{r['peak_gib']:.1f} GiB, onnx {stats.bytes / 2**30:.2f} GiB, {stats.fp8_weights} FP8 weights, "
              f"{stats.qdq_pairs} DQ]")
    assert stats.fp8_weights == r["n_linear"] == r["n_amax"] // 2
    assert stats.data is not None  # beyond 2 GiB limits: external data
    summary = qdq_summary(onnx.load(str(r["path"]), load_external_data=False))
    assert len(summary["quantized_linears"]) == r["n_linear"]


# The build runs in a child process so that its peak RSS is its own, not the export's.
_BUILD = """
import json, sys, time
from sd35trt.export.trt_build import build_engine
from sd35trt.runtime.components import component
from sd35trt.runtime.config import VARIANTS
profiles = VARIANTS["sd3.5-medium"].engine_profiles(sizes=(1024,) * 3, batches=(1, 1, 1))["transformer"]
t0 = time.perf_counter()
r = build_engine(sys.argv[1], sys.argv[2], flavor="tensorrt-rtx", compute_capability="sm89", profiles=profiles)
print(json.dumps({"wall_s": time.perf_counter() - t0, "parse_s": r.parse_seconds, "build_s": r.build_seconds,
                  "engine_bytes": r.engine_bytes, "version": r.trt_version,
                  "profile": {k: v for k, v in r.profile.items()},
                  "peak_gib": r.build_peak_rss_mib / 1024}))
"""
# The child's own ru_maxrss is useless here: a vfork+exec child inherits the parent's high-water
# mark (12.4 GiB after the export), so the build reports its sampled peak (BuildReport).


@pytest.mark.slow
def test_full_size_medium_fp8_engine_build_rtx(medium_fp8_onnx: dict, tmp_path: Path, capsys) -> None:
    """Static 1024² CFG-batch-2 FP8 transformer engine for sm89, built with TensorRT-RTX on the CPU."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="pip install 'sd35trt[trt-rtx]'")
    engine = tmp_path / "transformer.engine"
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(medium_fp8_onnx["path"]), str(engine)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"build failed (rc {proc.returncode}): {proc.stderr[-4000:]}"
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(f"\n[sd3.5-medium FP8 transformer, TensorRT-RTX {r['version']} sm89 static 1024² batch 2: "
              f"wall {r['wall_s']:.0f}s (parse {r['parse_s']:.0f}s, build {r['build_s']:.0f}s), "
              f"peak RSS {r['peak_gib']:.1f} GiB, engine {r['engine_bytes'] / 2**30:.2f} GiB]")
    assert engine.stat().st_size == r["engine_bytes"]
    assert r["profile"]["hidden_states"] == [[2, 16, 128, 128]] * 3
    onnx_bytes = medium_fp8_onnx["stats"].bytes
    assert r["engine_bytes"] < 0.75 * onnx_bytes * 2  # FP8 weights stay ~1 byte: far below a bf16 engine
