"""Our MMDiT equals diffusers' SD3Transformer2DModel for the same weights; real presets' sizes."""

from dataclasses import replace

import pytest
import torch

from sd35trt.export.tiny_model import TINY_TRANSFORMERS
from sd35trt.runtime.config import VARIANTS
from sd35trt.runtime.models.mmdit import MMDiT

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) is the reference model")


def _pair(spec, seed=0):
    cfg = {k: v for k, v in spec.to_config().items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = diffusers.SD3Transformer2DModel(**cfg).eval()
    ours = MMDiT(spec).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("family", ["large", "medium"])
@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])
def test_forward_matches_diffusers(family: str, hw: tuple[int, int]) -> None:
    ref, ours = _pair(TINY_TRANSFORMERS[family])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, *hw, generator=g)  # [B, 16, h, w]
    t = torch.tensor([1000.0, 137.5])
    ctx = torch.randn(2, 77 + 24, 96, generator=g)  # [B, 77+T, joint]
    pooled = torch.randn(2, 80, generator=g)
    with torch.no_grad():
        a = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
        b = ours(x, t, ctx, pooled)
    assert a.shape == b.shape == x.shape
    assert (a - b).abs().max().item() <= 1e-5
    assert a.std() > 0.1  # not a degenerate all-zero output


def test_without_qk_norm_matches_diffusers() -> None:
    ref, ours = _pair(replace(TINY_TRANSFORMERS["large"], qk_norm=None))
    x, ctx, pooled = torch.randn(1, 16, 8, 8), torch.randn(1, 90, 96), torch.randn(1, 80)
    with torch.no_grad():
        a = ref(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=ctx, pooled_projections=pooled).sample
        assert (a - ours(x, torch.tensor([500.0]), ctx, pooled)).abs().max() <= 1e-5


@pytest.mark.parametrize("name,billions", [("sd3.5-large", 8.06), ("sd3.5-medium", 2.24)])
def test_real_presets_have_released_sizes(name: str, billions: float) -> None:
    with torch.device("meta"):
        model = MMDiT(VARIANTS[name].transformer)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - billions) < 0.01, n
