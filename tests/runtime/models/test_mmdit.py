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


# The published `transformer/config.json` of stabilityai/stable-diffusion-3.5-large (Large Turbo's is
# the same) and -3.5-medium, written out here, not taken from our presets. diffusers' single-file
# loader tells them apart by the positional table: 192² = 36864 (Large) vs 384² = 147456 (Medium)
# patches (diffusers/loaders/single_file_utils.py, `infer_diffusers_model_type`).
PUBLISHED = {
    "sd3.5-large": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                        caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    "sd3.5-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=list(range(13))),
}


@pytest.mark.parametrize("name,billions", [("sd3.5-large", 8.06), ("sd3.5-medium", 2.24)])
def test_presets_equal_the_published_configs_and_diffusers_parameter_count(name: str, billions: float) -> None:
    """Our preset == the published config field by field; our MMDiT has exactly as many parameters
    (per tensor) as diffusers' SD3Transformer2DModel built from that config (both on `meta`)."""
    published = PUBLISHED[name]
    ours_cfg = {k: v for k, v in VARIANTS[name].transformer.to_config().items() if not k.startswith("_")}
    assert ours_cfg == {"dual_attention_layers": [], **published}
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**published)
        ours = MMDiT(VARIANTS[name].transformer)
    shapes = lambda m: {k: tuple(p.shape) for k, p in m.named_parameters()}  # noqa: E731
    assert shapes(ours) == shapes(ref)
    n = sum(p.numel() for p in ref.parameters())
    assert abs(n / 1e9 - billions) < 0.01, n  # the sizes the README quotes
    assert n == sum(p.numel() for p in ours.parameters())
