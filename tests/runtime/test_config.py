"""VariantConfig: shapes, defaults and engine profiles derive from one place."""

import pytest

from sd35trt.runtime import VARIANTS, InvalidInputError, VariantConfig


def test_real_variant_defaults() -> None:
    assert (VARIANTS["sd3.5-large"].sampling.steps, VARIANTS["sd3.5-large"].sampling.guidance) == (28, 3.5)
    assert (VARIANTS["sd3.5-medium"].sampling.steps, VARIANTS["sd3.5-medium"].sampling.guidance) == (40, 4.5)
    assert (VARIANTS["sd3.5-large-turbo"].sampling.steps, VARIANTS["sd3.5-large-turbo"].sampling.guidance) == (4, 0.0)
    assert all(v.sampling.shift == 3.0 for v in VARIANTS.values())


def test_real_shapes() -> None:
    large = VARIANTS["sd3.5-large"]
    assert large.default_size == 1024 and large.size_multiple == 16
    assert large.latent_shape(2, 1024, 768) == (2, 16, 128, 96)
    assert large.text_tokens() == 77 + 256 and large.joint_dim == 4096 and large.pooled_dim == 2048
    assert large.image_tokens(1024, 1024) == 4096
    assert large.transformer.inner_dim == 2432
    assert VARIANTS["sd3.5-medium"].transformer.dual_attention_layers == tuple(range(13))


def test_engine_profiles_double_the_batch_under_cfg_but_for_the_vae_and_the_slg_pass() -> None:
    prof = VARIANTS["sd3.5-large"].engine_profiles(sizes=(512, 1024, 1536), batches=(1, 1, 4))
    # the transformer's minimum is the image batch: the skip-layer pass runs on the prompts' rows alone
    assert prof["transformer"]["hidden_states"] == ((1, 16, 64, 64), (2, 16, 128, 128), (8, 16, 192, 192))
    assert prof["transformer"]["encoder_hidden_states"][2] == (8, 333, 4096)
    # the prompt encoders see [negatives; prompts] in one batch (runtime/text.py, pipeline._conditioning)
    assert prof["clip_l"]["input_ids"] == ((2, 77), (2, 77), (8, 77))
    assert prof["t5"]["input_ids"][2] == (8, 256)
    assert prof["vae_decoder"]["latent"][2] == (4, 16, 192, 192)
    nocfg = VARIANTS["sd3.5-large-turbo"].engine_profiles(cfg=False)
    assert nocfg["transformer"]["timestep"] == ((1,), (1,), (4,))


def test_profiles_refuse_sizes_off_grid() -> None:
    with pytest.raises(InvalidInputError, match="height=1000"):
        VARIANTS["sd3.5-large"].engine_profiles(sizes=(512, 1000, 1536))


def test_from_checkpoint_reads_configs(tiny_models) -> None:
    med = VariantConfig.from_checkpoint(tiny_models["medium"])
    assert med.family == "medium" and med.transformer.dual_attention_layers == (0, 1)
    assert med.transformer.qk_norm == "rms_norm" and med.name == "custom-medium"
    assert med.vae.latent_channels == 16 and med.vae.scaling_factor == 1.5305 and med.vae.shift_factor == 0.0609
    assert med.default_size == 128 and med.max_size == 512
    turbo = VariantConfig.from_checkpoint(tiny_models["turbo"])
    assert turbo.family == "large-turbo" and turbo.transformer == VariantConfig.from_checkpoint(tiny_models["large"]).transformer
    assert VariantConfig.from_checkpoint(tiny_models["large"], family="large-turbo").sampling.steps == 4
