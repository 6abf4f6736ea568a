"""Checkpoint: single files give the same config and tensors as the diffusers folder they came
from; architecture is read from shapes (also for the real presets); bad files are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35trt.export.single_file import write_single_file
from sd35trt.runtime import VARIANTS, CheckpointError, InvalidInputError, Pipeline
from sd35trt.runtime.checkpoint import Checkpoint, text_config, transformer_spec, vae_spec
from sd35trt.runtime.config import VaeSpec
from sd35trt.runtime.models.mmdit import MMDiT
from sd35trt.runtime.models.vae import VaeDecoder
from sd35trt.runtime.weights import MMDIT_SAI_NAMES, VAE_SAI_NAMES, rename_state


@pytest.fixture(scope="module")
def single(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """variant -> the model file of its single-file layout (T5 fp16)."""
    root = tmp_path_factory.mktemp("single")
    return {v: write_single_file(tiny_models[v], root / v) for v in ("medium", "large", "turbo")}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


CLIP_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
               "bos_token_id", "eos_token_id", "pad_token_id")
T5_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
             "relative_attention_max_distance", "feed_forward_proj", "dense_act_fn", "is_gated_act",
             "layer_norm_epsilon", "pad_token_id", "eos_token_id")


@pytest.mark.parametrize("variant", ["medium", "large"])
def test_single_file_round_trip_is_exact(variant: str, tiny_models, single) -> None:
    folder, file = Checkpoint.open(tiny_models[variant]), Checkpoint.open(single[variant])
    assert file.config == folder.config  # every shape, family, sampling default
    _assert_same(file.transformer_state(), folder.transformer_state())
    _assert_same(file.vae_decoder_state(), folder.vae_decoder_state())
    for name, fields in (("clip_l", CLIP_FIELDS), ("clip_g", CLIP_FIELDS), ("t5", T5_FIELDS)):
        (cfg_f, state_f), (cfg_s, state_s) = folder.text_encoder(name), file.text_encoder(name)
        assert {k: getattr(cfg_s, k) for k in fields} == {k: getattr(cfg_f, k) for k in fields}
        if name == "t5":  # the t5xxl_fp16 file holds fp16, as the released one does
            state_f = {k: t.to(torch.float16) for k, t in state_f.items()}
        _assert_same(state_s, state_f)
    assert file.tokenizer_dirs() == tuple(single[variant].parent / d for d in ("tokenizer", "tokenizer_2", "tokenizer_3"))
    assert file.tokenizer_classes() == ("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast")
    assert Path(file) == single[variant] and Path(folder) == tiny_models[variant]  # os.PathLike for backends


def test_family_from_shapes_hint_or_override_never_the_name(single, tmp_path: Path) -> None:
    renamed = tmp_path / "x"
    shutil.copytree(single["medium"].parent, renamed)
    (renamed / "sd3.5_medium.safetensors").rename(renamed / "sd3.5_large.safetensors")
    assert Checkpoint.open(renamed / "sd3.5_large.safetensors").config.family == "medium"  # dual attention
    turbo = Checkpoint.open(single["turbo"])
    assert single["turbo"].name == "sd3.5_large_turbo.safetensors"
    assert turbo.config.family == "large-turbo" and turbo.config.sampling.steps == 4  # tiny hint
    assert Checkpoint.open(single["turbo"], family="large").config.sampling.steps == 28


def test_t5_may_be_omitted(single, tmp_path: Path) -> None:
    layout = tmp_path / "no_t5"
    shutil.copytree(single["large"].parent, layout, ignore=shutil.ignore_patterns("t5xxl*", "tokenizer_3"))
    ckpt = Checkpoint.open(layout / single["large"].name)
    assert ckpt.files["t5"] is None and ckpt.text_encoder("t5") is None
    assert ckpt.tokenizer_dirs()[2] is None  # tokenizer_3/ is not needed without T5
    pipe = Pipeline.from_pretrained(layout / single["large"].name, device="cpu")
    assert pipe.backend.t5 is None
    assert Checkpoint.open(single["large"], t5=False).files["t5"] is None


def test_encoders_in_text_encoders_subfolder_and_tokenizers_elsewhere(single, tmp_path: Path) -> None:
    layout, toks = tmp_path / "models", tmp_path / "toks"
    (layout / "text_encoders").mkdir(parents=True)
    shutil.copy(single["medium"], layout)
    for f in ("clip_l", "clip_g", "t5xxl_fp16"):
        shutil.copy(single["medium"].parent / f"{f}.safetensors", layout / "text_encoders")
    for d in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.copytree(single["medium"].parent / d, toks / d)
    ckpt = Checkpoint.open(layout / single["medium"].name, tokenizers=toks)
    assert ckpt.files["t5"] == layout / "text_encoders" / "t5xxl_fp16.safetensors"
    assert ckpt.tokenizer_dirs()[0] == toks / "tokenizer"
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(layout / single["medium"].name).tokenizer_dirs()
    msg = str(info.value)
    assert "tokenizer/, tokenizer_2/, tokenizer_3/" in msg and str(layout) in msg and "tokenizers=" in msg


def test_missing_tokenizers_fail_before_any_weights_load(single, tmp_path: Path) -> None:
    layout = tmp_path / "no_tok"
    shutil.copytree(single["medium"].parent, layout, ignore=shutil.ignore_patterns("tokenizer_2"))
    with pytest.raises(CheckpointError, match=r"missing: tokenizer_2/\)") as info:
        Pipeline.from_pretrained(layout / single["medium"].name, device="cpu")
    assert str(layout / single["medium"].name) in str(info.value)


def test_pickle_and_non_sd3_files_are_refused(single, tiny_medium: Path, tmp_path: Path) -> None:
    for suffix in (".ckpt", ".pt"):
        bad = tmp_path / f"sd3.5_large{suffix}"
        bad.write_bytes(b"not loaded")
        with pytest.raises(CheckpointError, match="pickle") as info:
            Pipeline.from_pretrained(bad)
        assert str(bad) in str(info.value) and "safetensors" in str(info.value)
    clip = single["medium"].parent / "clip_l.safetensors"
    with pytest.raises(CheckpointError, match="not an SD3/SD3.5 model file") as info:
        Pipeline.from_pretrained(clip)
    assert str(clip) in str(info.value) and "clip_l= or clip_g=" in str(info.value)
    garbage = tmp_path / "sd3.5_medium.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Checkpoint.open(garbage)
    with pytest.raises(InvalidInputError, match="clip_l="):
        Checkpoint.open(tiny_medium, clip_l=clip)


def test_encoder_files_are_checked(single, tmp_path: Path) -> None:
    model, parent = single["medium"], single["medium"].parent
    with pytest.raises(CheckpointError, match="taken as clip_g but is not a CLIPTextModelWithProjection"):
        Checkpoint.open(model, clip_g=parent / "t5xxl_fp16.safetensors")
    with pytest.raises(CheckpointError, match="t5='.*nope.safetensors' does not exist"):
        Checkpoint.open(model, t5=tmp_path / "nope.safetensors")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(model, lonely)
    with pytest.raises(CheckpointError, match="clip_l.safetensors is not in") as info:
        Checkpoint.open(lonely / model.name)
    assert "clip_l=PATH" in str(info.value)


def test_fp8_t5_is_upcast_with_its_scale(single, tmp_path: Path) -> None:
    parent = single["medium"].parent
    fp16 = load_file(parent / "t5xxl_fp16.safetensors")
    scaled: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, t in fp16.items():  # ComfyUI's "scaled" fp8 layout: weight / scale in fp8, plus scale_weight
        if t.dim() == 2:
            scale = t.float().abs().max() / 448
            scaled[k] = (t.float() / scale).to(torch.float8_e4m3fn)
            scaled[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            scaled[k] = t
    save_file(scaled, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    cfg, state = Checkpoint.open(single["medium"], t5=tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors").text_encoder("t5")
    assert sorted(state) == sorted(set(fp16) | {"encoder.embed_tokens.weight"})
    for k, t in fp16.items():
        if t.dim() == 2:
            expect = scaled[k].float() * scaled[k[: -len("weight")] + "scale_weight"]
            assert state[k].dtype == torch.float32 and torch.equal(state[k], expect), k
            assert (state[k] - t.float()).abs().max() <= 0.07 * t.float().abs().max()  # e4m3: 3 mantissa bits
    assert state["encoder.embed_tokens.weight"] is state["shared.weight"]


@pytest.mark.parametrize("name", ["sd3.5-large", "sd3.5-medium"])
def test_real_presets_are_recognised_from_shapes(name: str) -> None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    spec = VARIANTS[name].transformer
    with torch.device("meta"):
        mmdit, vae = MMDiT(spec), VaeDecoder(VaeSpec())
    sai = rename_state(mmdit.state_dict(), MMDIT_SAI_NAMES, "sai", name, last=spec.num_layers - 1)
    shapes = {k: tuple(t.shape) for k, t in sai.items()}
    assert transformer_spec(shapes, {}) == spec
    # diffusers' own detector names the same model from these (real-size) names and shapes
    kind = infer_diffusers_model_type({"model.diffusion_model." + k: t for k, t in sai.items()})
    assert kind == name.replace("sd3.5-", "sd35_")
    ldm = rename_state(vae.state_dict(), VAE_SAI_NAMES, "sai", name, n_up=4)
    assert vae_spec({k: tuple(t.shape) for k, t in ldm.items()}, {}) == VaeSpec()


def test_real_text_encoders_are_recognised_from_shapes() -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    real = {
        "clip_l": CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                                 num_attention_heads=12, hidden_act="quick_gelu"),
        "clip_g": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                                 num_attention_heads=20, hidden_act="gelu"),
        "t5": T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       feed_forward_proj="gated-gelu", is_encoder_decoder=False),
    }
    for name, cfg in real.items():
        with torch.device("meta"):
            model = (T5EncoderModel if name == "t5" else CLIPTextModelWithProjection)(cfg)
        got = text_config(name, {k: tuple(t.shape) for k, t in model.state_dict().items()}, {})
        fields = [f for f in (T5_FIELDS if name == "t5" else CLIP_FIELDS) if "token_id" not in f]
        assert {f: getattr(got, f) for f in fields} == {f: getattr(cfg, f) for f in fields}, name
