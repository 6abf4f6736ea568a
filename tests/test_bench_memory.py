"""The memory-modes bench's measuring loop (sd35trt/bench_memory.py `measure_modes`) on the CPU with
a tiny checkpoint: the same loop the GPU run takes (only the random full-size torch-fp8 modules and
the device differ; peaks are 0 off CUDA), with the per-stage weight budget it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd35trt.bench_memory import measure_modes
from sd35trt.runtime import Pipeline


def test_measure_modes_rows_and_stage_budget(tiny_medium: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(tiny_medium, backend="torch", device="cpu", dtype=torch.float32)
    tokenizers = (pipe.encode.tok_l, pipe.encode.tok_g, pipe.encode.tok_t5)
    out = tmp_path / "memory.json"
    rows = measure_modes(pipe.config, pipe.backend, tokenizers, 64, 1, ["default", "low"], repeats=1,
                         meta={"preset": "tiny"}, out=out)
    default, low = rows
    assert [r["memory"] for r in rows] == ["default", "low"] and default["images"] == low["images"] == 3
    assert "stages" not in default and low["repeated_vs_first_mode"] > 0 and out.is_file()
    stages = low["stages"]
    assert list(stages) == ["clip_l", "clip_g", "t5", "transformer", "vae"]
    handles = pipe.backend.residency.handles if hasattr(pipe.backend, "residency") else None
    assert handles is None  # the bench wraps the backend per mode; the pipeline's own stays default
    modules = pipe.backend.modules
    nbytes = {c: sum(t.numel() * t.element_size() for t in {id(t): t for t in [*m.parameters(), *m.buffers()]}.values())
              for c, m in modules.items()}
    assert stages["transformer"]["weights_bytes"] == nbytes["transformer"]  # low: the transformer alone
    assert stages["vae"]["weights_bytes"] == nbytes["vae_decoder"] + nbytes["vae_encoder"]
    assert 0 < stages["t5"]["weights_bytes"] < nbytes["t5"]  # streamed: two pieces at a time, not the whole encoder
    with pytest.raises(ValueError, match="in the order"):
        measure_modes(pipe.config, pipe.backend, tokenizers, 64, 1, ["low", "default"], repeats=0)
