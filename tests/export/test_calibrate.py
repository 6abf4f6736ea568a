"""FP8 calibration: reproducible scales, saved/reloaded exactly, exclusions honoured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd35trt.export.calibrate import DEFAULT_EXCLUDE, CalibSettings, CalibState, apply_calibration, calibrate, read_prompts
from sd35trt.runtime import InvalidInputError, Pipeline

pytest.importorskip("modelopt", reason="nvidia-modelopt (export extra) calibrates FP8")
SETTINGS = CalibSettings(num_prompts=2, steps=3, height=64, width=64, seed=7)


def _calibrate(path: Path, settings: CalibSettings = SETTINGS) -> CalibState:
    pipe = Pipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
    state, _ = calibrate(pipe.encode, pipe.backend.modules["transformer"], settings, progress=False)
    return state


def test_same_seed_same_scales_other_seed_other_scales(tiny_medium: Path) -> None:
    a, b = _calibrate(tiny_medium), _calibrate(tiny_medium)
    assert a.amax == b.amax and len(a.amax) > 0
    c = _calibrate(tiny_medium, CalibSettings(num_prompts=2, steps=3, height=64, width=64, seed=8))
    inputs = [k for k in a.amax if k.endswith("input_quantizer")]
    assert any(a.amax[k] != c.amax[k] for k in inputs)  # activations saw other trajectories
    assert all(a.amax[k] == c.amax[k] for k in a.amax if k.endswith("weight_quantizer"))


def test_every_block_linear_quantized_and_exclusions_not(tiny_medium: Path) -> None:
    state = _calibrate(tiny_medium)
    pipe = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)
    linears = [n for n, m in pipe.backend.transformer.model.named_modules() if isinstance(m, torch.nn.Linear)]
    expected = {n for n in linears if not n.startswith(DEFAULT_EXCLUDE)}
    quantized = {k.rsplit(".", 1)[0] for k in state.amax}
    assert quantized == expected
    assert all(state.amax[f"{n}.input_quantizer"] > 0 and state.amax[f"{n}.weight_quantizer"] > 0 for n in expected)
    assert any(n.startswith("context_embedder") for n in linears)  # exclusions exist and were skipped


def test_save_load_apply_round_trip(tiny_medium: Path, tmp_path: Path) -> None:
    state = _calibrate(tiny_medium)
    state.save(tmp_path / "calib")
    loaded = CalibState.load(tmp_path / "calib")
    assert loaded.amax == state.amax and loaded.settings == state.settings
    pipe = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)
    model = apply_calibration(pipe.backend.transformer.model, loaded)
    from sd35trt.export.calibrate import collect_amax

    assert collect_amax(model) == pytest.approx(state.amax, rel=0, abs=0)
    assert sorted(p.name for p in (tmp_path / "calib").iterdir()) == ["amax.json", "amax.safetensors"]


def test_prompt_count_checked() -> None:
    with pytest.raises(InvalidInputError, match="calib size 0"):
        read_prompts(0)
    prompts, negatives = read_prompts(256)
    assert len(set(prompts)) == 256 and len(negatives) >= 10
