"""Memory modes on a CUDA GPU (torch backend, tiny checkpoint): what the residency report says is
what device memory holds, and the images are identical across modes. `pytest -m gpu tests/runtime/test_memory_gpu.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.runtime import Pipeline
from sd35trt.runtime.memory import MODES, STAGES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine)")]
KW = dict(prompt="a lighthouse at dusk", negative_prompt="fog", height=128, width=128, num_inference_steps=4,
          guidance_scale=4.0, progress=False)


def _weights_on_cuda(pipe: Pipeline) -> dict[str, int]:
    """component -> bytes of its tensors that live on the GPU now (read from the tensors)."""
    return {c: sum(t.numel() * t.element_size() for t, _ in h.tensors if t.is_cuda)
            for c, h in pipe.backend.residency.handles.items()}


def _t5_probe(pipe: Pipeline) -> tuple[list[tuple[int, set[int], int]], list]:
    """Pre-hooks on T5's streamed pieces recording (piece, pieces with CUDA tensors, other components'
    CUDA bytes) as each piece starts, read from the tensors' devices."""
    from functools import partial

    from sd35trt.runtime.models.streaming import t5_pieces

    t5 = pipe.backend.residency.handles["t5"]
    seen: list[tuple[int, set[int], int]] = []

    def probe(i, m, args):
        on = {j for j, w in enumerate(t5.pieces) if any(t.is_cuda for t, _ in w.tensors)}
        others = sum(b for c, b in _weights_on_cuda(pipe).items() if c != "t5")
        seen.append((i, on, others))

    pieces = t5_pieces(pipe.backend.modules["t5"])
    return seen, [p.register_forward_pre_hook(partial(probe, i)) for i, p in enumerate(pieces)]


def test_modes_on_the_gpu(tiny_medium: Path) -> None:
    images, allocated = {}, {}
    for mode in MODES:
        pipe = Pipeline.from_pretrained(tiny_medium, backend="torch", device="cuda", dtype=torch.float32, memory=mode)
        seen: list[dict[str, int]] = []
        hook = (lambda p, i, t, kw: seen.append(_weights_on_cuda(p)) or {}) if mode != "default" else None
        streamed, hooks = _t5_probe(pipe) if mode == "low" else ([], [])
        out = pipe(**KW, generator=torch.Generator().manual_seed(2), callback_on_step_end=hook)
        for h in hooks:
            h.remove()
        if mode == "low":  # T5 streams: this piece and the next (prefetched) on the GPU, nothing of other stages
            assert [i for i, _, _ in streamed] == list(range(len(streamed))) and len(streamed) >= 3
            for i, on, others in streamed:
                assert i in on and on <= {i, i + 1} and others == 0, (i, on, others)
        images[mode] = np.asarray(out.images[0])
        torch.cuda.synchronize()
        allocated[mode] = torch.cuda.memory_allocated()
        if mode == "low":
            sizes = {c: h.nbytes for c, h in pipe.backend.residency.handles.items()}
            assert all(s["transformer"] == sizes["transformer"] and sum(s.values()) == sizes["transformer"]
                       for s in seen)  # only the transformer's bytes on the GPU during denoising
            for stage, resident in pipe.backend.residency_report():
                assert resident == set(STAGES[stage]) & set(sizes), (stage, resident)
            on = _weights_on_cuda(pipe)
            assert {c for c, b in on.items() if b} == {"vae_decoder", "vae_encoder"}
        if mode == "balanced":
            assert all(s["clip_l"] == s["clip_g"] == s["t5"] == 0 and s["transformer"] for s in seen)
        pipe.close()
        del pipe
        torch.cuda.empty_cache()
    assert np.array_equal(images["default"], images["balanced"])
    assert np.array_equal(images["default"], images["low"])
    print(f"\n[allocated after one image: {allocated}]")
    assert allocated["low"] < allocated["balanced"] < allocated["default"]
