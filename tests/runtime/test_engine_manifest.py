"""Engine-set shapes derive from the variant config (pure; no TensorRT needed)."""

import pytest

from sd35trt.runtime import VARIANTS, InvalidInputError, VariantConfig
from sd35trt.runtime.engine_manifest import FP8_GPUS, EngineShapes


def test_static_is_the_default_size_and_dynamic_spans_half_to_one_and_a_half() -> None:
    medium = VARIANTS["sd3.5-medium"]
    assert EngineShapes.for_variant(medium) == EngineShapes(False, (1024,) * 3, (1, 1, 1), True)
    dyn = EngineShapes.for_variant(medium, dynamic=True, batch=(1, 4))
    assert (dyn.sizes, dyn.batches) == ((512, 1024, 1536), (1, 1, 4))
    prof = dyn.profiles(medium)
    # minimum: the image batch (the skip-layer pass runs the prompts' rows alone); opt and max doubled
    assert prof["transformer"]["hidden_states"] == ((1, 16, 64, 64), (2, 16, 128, 128), (8, 16, 192, 192))
    assert prof["transformer"]["encoder_hidden_states"][0] == (1, 77 + 256, 4096)
    assert prof["vae_decoder"]["latent"][2] == (4, 16, 192, 192)
    assert EngineShapes.for_variant(medium, True, (1, 1), 768, 768).sizes == (768, 768, 768)


def test_turbo_has_no_cfg_batch() -> None:
    turbo = EngineShapes.for_variant(VARIANTS["sd3.5-large-turbo"])
    assert not turbo.cfg and turbo.profiles(VARIANTS["sd3.5-large-turbo"])["transformer"]["timestep"] == ((1,),) * 3


def test_tiny_range_fits_its_positional_embedding(tiny_medium) -> None:
    tiny = VariantConfig.from_checkpoint(tiny_medium)  # default 128 px, max 512 px
    assert EngineShapes.for_variant(tiny, dynamic=True).sizes == (64, 128, 192)
    with pytest.raises(InvalidInputError, match="height=1024 is outside"):
        EngineShapes.for_variant(tiny, dynamic=True, max_size=1024)


def test_bad_shape_requests_are_refused() -> None:
    medium = VARIANTS["sd3.5-medium"]
    with pytest.raises(InvalidInputError, match="batch=2-1"):
        EngineShapes.for_variant(medium, batch=(2, 1))
    with pytest.raises(InvalidInputError, match="apply to dynamic engines"):
        EngineShapes.for_variant(medium, max_size=1536)
    with pytest.raises(InvalidInputError, match="min_size=1536, max_size=512"):
        EngineShapes.for_variant(medium, True, (1, 1), 1536, 512)
    with pytest.raises(InvalidInputError, match="height=1000 is not a multiple of 16"):
        EngineShapes.for_variant(medium, True, (1, 1), 1000, 1536)


def test_round_trip_and_fp8_gpus() -> None:
    s = EngineShapes.for_variant(VARIANTS["sd3.5-large"], dynamic=True, batch=(1, 2))
    assert EngineShapes.from_dict(s.to_dict()) == s
    assert "sm86" not in FP8_GPUS and "sm80" not in FP8_GPUS and {"sm89", "sm90", "sm120"} <= set(FP8_GPUS)
