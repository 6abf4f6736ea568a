"""fuse=True on torch-fp8 from the checkpoint's weights: one E4M3 rounding of W + s·BA, not two.

runtime/lora_source.py reads a layer's bf16 weight (a fused q/k/v rebuilt from its three tensors)
from a diffusers folder or a single file; `fuse_lora` re-quantizes W_src + s·BA from it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sd35trt.runtime import Pipeline
from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.lora_files import read_lora
from sd35trt.runtime.lora_source import source_weight
from sd35trt.runtime.models.fp8 import E4M3_MAX, HIGH_PRECISION, FP8Linear, max_calibrate, to_e4m3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_writers import write_peft_lora  # noqa: E402

pytest.importorskip("peft", reason="peft (test extra) writes the diffusers-layout LoRA")
KW = dict(prompt="an orange cat", negative_prompt="blurry", height=64, width=64, num_inference_steps=2,
          guidance_scale=4.5, output_type="latent")
QKV = ("to_q", "to_k", "to_v")


def _deq(layer: FP8Linear) -> torch.Tensor:
    return layer.weight_t.t().float() * layer.scale_w  # [out, in]


def _q(w: torch.Tensor) -> torch.Tensor:
    """w rounded to E4M3 once, per tensor with a fresh scale, dequantized."""
    scale = max(float(w.abs().max()), 1e-12) / E4M3_MAX
    return to_e4m3(w, scale).float() * scale


def test_fused_fp8_weights_are_one_rounding_of_the_checkpoint_weight_plus_lora(tiny_models: dict[str, Path],
                                                                               tmp_path: Path, capsys) -> None:
    path, scale = tiny_models["large"], 0.8
    file = write_peft_lora(path, tmp_path / "style.safetensors", std=0.1)
    ref = Pipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
    amax = max_calibrate(ref.backend.modules["transformer"], lambda m: ref(**KW, progress=False), HIGH_PRECISION)
    fp8 = Pipeline.from_pretrained(path, backend="torch-fp8", device="cpu", calibration=amax)
    mmdit = fp8.backend.modules["transformer"]
    before = {n: _deq(m) for n, m in mmdit.named_modules() if isinstance(m, FP8Linear)}
    fp8.load_lora(file, fuse=True, scale=scale)
    parts = read_lora(file, fp8.config.transformer.num_layers).parts["transformer"]
    src = ref.backend.modules["transformer"].state_dict()  # fp32 weights: the exact W + s·BA
    new_err = old_err = 0.0
    for name, m in mmdit.named_modules():
        parent, _, leaf = name.rpartition(".")
        leaves = [f"{parent}.{p}" for p in QKV] if leaf == "to_qkv" else [name]
        if not isinstance(m, FP8Linear) or leaves[0] not in parts:
            continue
        delta = torch.cat([scale * (parts[n].up @ parts[n].down) for n in leaves])  # [out, in]
        w_bf16 = torch.cat([src[f"{n}.weight"].to(torch.bfloat16).float() for n in leaves])
        assert torch.equal(_deq(m), _q(w_bf16 + delta)), name  # quantize(W_src + s·BA), fresh scale
        exact = torch.cat([src[f"{n}.weight"] for n in leaves]) + delta
        new_err += float((_deq(m) - exact).norm() / exact.norm())
        old_err += float((_q(before[name] + delta) - exact).norm() / exact.norm())  # fuse from E4M3: twice rounded
    with capsys.disabled():
        print(f"\n[tiny large fused FP8 weights, summed rel err vs fp32 W + s·BA: from the checkpoint "
              f"{new_err:.5f}, from the E4M3 weights (before) {old_err:.5f}]")
    assert 0 < new_err <= old_err


def test_single_file_source_equals_the_folder_source(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from sd35trt.export.single_file import write_single_file

    folder = Checkpoint.open(tiny_models["large"])
    single = Checkpoint.open(write_single_file(tiny_models["large"], tmp_path / "sf"))
    for layer in ("transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn.add_qkv",
                  "transformer_blocks.1.ff.net.2", "transformer_blocks.0.norm1.linear"):
        a = source_weight(folder, "transformer", layer, torch.bfloat16)
        b = source_weight(single, "transformer", layer, torch.bfloat16)
        assert a is not None and a.dtype == torch.bfloat16 and torch.equal(a, b), layer
    q = source_weight(folder, "transformer", "transformer_blocks.0.attn.to_q", torch.float32)
    assert torch.equal(q, folder.transformer_state()["transformer_blocks.0.attn.to_q.weight"])
    assert source_weight(folder, "transformer", "transformer_blocks.0.attn.nope", torch.bfloat16) is None
    assert source_weight(folder, "clip_l", "text_model.encoder.layers.0.mlp.fc1", torch.bfloat16) is None
