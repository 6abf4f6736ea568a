"""Our VAE decoder equals diffusers' AutoencoderKL.decode for the same weights."""

import pytest
import torch

from sd35trt.export.tiny_model import TINY_VAE, autoencoder
from sd35trt.runtime.models.vae import VaeDecoder

pytest.importorskip("diffusers", reason="diffusers (test extra) is the reference model")


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_decode_matches_diffusers(hw: tuple[int, int]) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        ref = autoencoder().eval()
    ours = VaeDecoder(TINY_VAE).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k.startswith("decoder.")})
    z = torch.randn(2, 16, *hw, generator=torch.Generator().manual_seed(0))  # [B, 16, h, w]
    with torch.no_grad():
        a, b = ref.decode(z).sample, ours(z)
    assert a.shape == b.shape == (2, 3, hw[0] * 8, hw[1] * 8)
    assert (a - b).abs().max().item() <= 1e-4
    assert a.std() > 0.05


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_encode_matches_diffusers(hw: tuple[int, int]) -> None:
    from sd35trt.runtime.models.vae import VaeEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        ref = autoencoder().eval()
    ours = VaeEncoder(TINY_VAE).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k.startswith("encoder.")})
    image = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1)) * 2 - 1  # [B, 3, H, W]
    with torch.no_grad():
        a, b = ref.encode(image).latent_dist.parameters, ours(image)  # moments: mean ++ logvar
    assert a.shape == b.shape == (2, 32, hw[0] // 8, hw[1] // 8)
    assert (a - b).abs().max().item() <= 1e-4
    assert a.std() > 0.01
