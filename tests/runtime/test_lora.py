"""LoRA parity: our Pipeline (torch, fp32) with `load_lora` + `loras=` equals diffusers'
`load_lora_weights` + `set_adapters(..., adapter_weights=...)` on the tiny large and medium models.

Two LoRAs: "style" written by peft/diffusers (transformer, CLIP-L, CLIP-G; lora_alpha 8 on rank
4 from the adapter metadata) and "detail" in the kohya/SAI layout (fused qkv, `.alpha`, lora_te1/2).
Seen: max abs <= 4e-6 on [0, 1] images; strength 0 gives the image without LoRAs bit for bit.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.runtime import CheckpointError, InvalidInputError, Pipeline
from sd35trt.runtime.batching import Job, MicroBatcher
from sd35trt.runtime.pipeline import seed_generators

from lora_writers import write_kohya_lora, write_peft_lora

diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) is the reference pipeline")
pytest.importorskip("peft", reason="peft (test extra) backs diffusers' load_lora_weights")
CALL = dict(prompt="a lighthouse at dusk, oil painting", negative_prompt="blurry", height=64, width=64,
            num_inference_steps=3, guidance_scale=4.0, output_type="np")
# (style, detail) strengths; the reference activates both adapters with these weights
CASES = {"style-1.0": (1.0, 0.0), "style-0.5": (0.5, 0.0), "kohya-1.0": (0.0, 1.0), "kohya-0.6": (0.0, 0.6),
         "both": (0.7, 1.3)}


@pytest.fixture(scope="module")
def lora_pipes(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = {}
    for variant in ("large", "medium"):
        path, folder = tiny_models[variant], tmp_path_factory.mktemp(f"lora-{variant}")
        style = write_peft_lora(path, folder / "style.safetensors")
        detail_ref = write_kohya_lora(path, folder / "detail.safetensors")
        ref = diffusers.StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=torch.float32)
        ref.set_progress_bar_config(disable=True)
        ref.load_lora_weights(str(style), adapter_name="style")
        ref.load_lora_weights(detail_ref, adapter_name="detail")
        ours = Pipeline.from_pretrained(path, backend="torch", device="cpu", dtype=torch.float32)
        plain = ours(generator=torch.Generator().manual_seed(7), progress=False, **CALL).images  # before any LoRA
        assert ours.load_lora(style) == "style"
        ours.load_lora(folder / "detail.safetensors", name="detail")
        out[variant] = (ref, ours, plain, folder)
    return out


@pytest.mark.parametrize("variant", ["large", "medium"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_image_matches_diffusers(lora_pipes, variant: str, case: str) -> None:
    ref, ours, plain, _ = lora_pipes[variant]
    s_style, s_detail = CASES[case]
    ref.set_adapters(["style", "detail"], adapter_weights=[s_style, s_detail])
    a = ref(generator=torch.Generator().manual_seed(7), **CALL).images
    b = ours(generator=torch.Generator().manual_seed(7), progress=False, loras={"style": s_style, "detail": s_detail},
             **CALL).images
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(b - plain).max() > 0.02  # the LoRA changes the image: a no-op would fail here


@pytest.mark.parametrize("variant", ["large", "medium"])
def test_strength_zero_and_no_loras_equal_the_plain_image(lora_pipes, variant: str) -> None:
    _, ours, plain, _ = lora_pipes[variant]
    zero = ours(generator=torch.Generator().manual_seed(7), progress=False, loras={"style": 0.0, "detail": 0.0},
                **CALL).images
    none = ours(generator=torch.Generator().manual_seed(7), progress=False, **CALL).images
    assert np.array_equal(zero, plain) and np.array_equal(none, plain)


def test_text_encoder_parts_are_applied(lora_pipes) -> None:
    """The CLIP parts alone move the prompt embedding (the MMDiT part is not all there is)."""
    _, ours, _, _ = lora_pipes["large"]
    enc, _ = ours.lora_calls(ours.check_request("a fox", loras={"style": 1.0}))
    base, _ = ours.lora_calls(ours.check_request("a fox", loras={"style": 0.0}))
    with torch.inference_mode():
        c1, p1 = enc(["a fox"], ["a fox"], ["a fox"], 16)
        c0, p0 = base(["a fox"], ["a fox"], ["a fox"], 16)
    assert (p1 - p0).abs().max() > 1e-3 and (c1[:, :77] - c0[:, :77]).abs().max() > 1e-3


def test_per_image_strengths_in_one_call_equal_separate_calls(lora_pipes) -> None:
    _, ours, _, _ = lora_pipes["large"]
    kw = {**CALL, "prompt": ["a red fox", "a red fox"], "negative_prompt": ["", ""]}
    both = ours(generator=seed_generators(3, 2), progress=False, loras=[{"style": 0.3}, {"detail": 1.1}], **kw).images
    one = ours(generator=seed_generators(3, 1), progress=False, loras={"style": 0.3}, **{**CALL, "prompt": "a red fox",
                                                                                      "negative_prompt": ""}).images
    assert np.abs(both[:1] - one).max() <= 1e-5


def test_four_concurrent_requests_with_different_strengths_run_as_one_batch(lora_pipes) -> None:
    _, ours, _, _ = lora_pipes["large"]
    shape = dict(height=64, width=64, steps=3, guidance=4.0, output_type="np")
    jobs = [Job("a lighthouse", "blurry", seed=3, loras=(("style", 0.2),), **shape),
            Job("a red fox", None, seed=11, loras=(("style", 0.9), ("detail", 0.5)), **shape),
            Job("a castle", "fog", seed=12, loras=(("detail", -0.7),), **shape),
            Job("a bowl of ramen", None, seed=900, **shape)]
    barrier, tickets = threading.Barrier(4), [None] * 4
    with MicroBatcher(ours, max_batch=4, window_ms=2000) as batcher:
        def submit(i: int) -> None:
            barrier.wait()
            tickets[i] = batcher.submit(jobs[i])

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
        [t.start() for t in threads], [t.join() for t in threads]
        outs = [t.result(120).images for t in tickets]
        stats = batcher.stats()
    assert stats.batches == 1 and stats.batch_sizes == {4: 1}
    for job, got in zip(jobs, outs):
        kw = job.call_kwargs()
        kw["generator"] = torch.Generator().manual_seed(job.seed)  # the twin: a direct call
        twin = ours(**kw, progress=False).images
        assert np.abs(got - twin).max() <= 1e-5, job


def test_concurrent_calls_with_different_loras_are_each_their_own(lora_pipes) -> None:
    _, ours, _, _ = lora_pipes["large"]
    settings = [{"style": 1.0}, {"detail": 1.0}, {}, {"style": 0.4, "detail": 0.4}]
    alone = [ours(generator=torch.Generator().manual_seed(5), progress=False, loras=s, **CALL).images for s in settings]
    got = [None] * 4

    def run(i: int) -> None:
        got[i] = ours(generator=torch.Generator().manual_seed(5), progress=False, loras=settings[i], **CALL).images

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    [t.start() for t in threads], [t.join() for t in threads]
    assert all(np.array_equal(a, b) for a, b in zip(alone, got))


def test_load_unload_and_bad_calls(lora_pipes) -> None:
    _, ours, plain, folder = lora_pipes["medium"]
    assert ours.loras == ["style", "detail"]
    with pytest.raises(InvalidInputError, match="'nope'"):
        ours(loras={"nope": 1.0}, **CALL)
    with pytest.raises(InvalidInputError, match=r"loras\['style'\]=99"):
        ours(loras={"style": 99}, **CALL)
    with pytest.raises(InvalidInputError, match="slots are in use"):
        ours.load_lora(folder / "style.safetensors", name="third")
    with pytest.raises(InvalidInputError, match="taken"):
        ours.load_lora(folder / "style.safetensors")
    ours.unload_lora("detail")
    assert ours.loras == ["style"]
    with pytest.raises(InvalidInputError, match="'detail' is not loaded"):
        ours(loras={"detail": 1.0}, **CALL)
    ours.load_lora(folder / "detail.safetensors", name="detail")  # back in a free slot
    again = ours(generator=torch.Generator().manual_seed(7), progress=False, loras={"detail": 0.0}, **CALL).images
    assert np.array_equal(again, plain)


def test_fuse_equals_the_side_path_in_fp32(tiny_models: dict[str, Path], lora_pipes) -> None:
    _, ours, _, folder = lora_pipes["large"]
    side = ours(generator=torch.Generator().manual_seed(7), progress=False, loras={"style": 0.8}, **CALL).images
    fused = Pipeline.from_pretrained(tiny_models["large"], backend="torch", device="cpu", dtype=torch.float32)
    fused.load_lora(folder / "style.safetensors", fuse=True, scale=0.8)
    got = fused(generator=torch.Generator().manual_seed(7), progress=False, **CALL).images
    assert np.abs(got - side).max() <= 1e-4
    assert fused.lora_info()[0]["fused"] and fused.lora_info()[0]["scale"] == 0.8
    with pytest.raises(InvalidInputError, match="fused"):
        fused(loras={"style": 1.0}, **CALL)
    with pytest.raises(InvalidInputError, match="fused"):
        fused.unload_lora("style")


def test_a_lora_for_another_model_size_names_the_key_and_shapes(tiny_models: dict[str, Path], tmp_path: Path,
                                                                  lora_pipes) -> None:
    from safetensors.torch import save_file

    _, ours, _, _ = lora_pipes["large"]
    bad = tmp_path / "big.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.zeros(128, 4)}, str(bad))
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn\.to_k.*\[32, 32\].*\[128, 64\]"):
        ours.load_lora(bad)
    pt = tmp_path / "lora.pt"
    pt.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="only safetensors"):
        ours.load_lora(pt)
    assert ours.loras == ["style", "detail"]  # nothing half-loaded
