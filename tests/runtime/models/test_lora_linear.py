"""The LoRA side path: its math, per-row strengths, FP8 fidelity, fuse=True, and no recompiles."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sd35trt.runtime import Pipeline
from sd35trt.runtime.models.fp8 import HIGH_PRECISION, FP8Linear, max_calibrate
from sd35trt.runtime.models.lora_fp8 import VARIANTS
from sd35trt.runtime.models.lora_linear import LoraBank, LoraLinear, fuse_delta

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_writers import write_peft_lora  # noqa: E402

KW = dict(prompt="an orange cat on a windowsill", negative_prompt="blurry", height=64, width=64,
          num_inference_steps=6, guidance_scale=4.5, output_type="latent")


def test_side_path_is_base_plus_scaled_low_rank_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(24, 3 * 16)
    bank = LoraBank(slots=2, rank=4, device=torch.device("cpu"), dtype=torch.float32)
    layer = LoraLinear(base, bank, groups=3)  # a fused q/k/v: three independent LoRAs
    ab = [(torch.randn(r, 24, generator=g), torch.randn(16, r, generator=g)) for r in (2, 4, 3)]
    for grp, (a, b) in enumerate(ab):
        layer.set_slot(1, grp, a, b)
    x = torch.randn(3, 5, 24, generator=g)  # [B, N, in]
    bank.set_rows(torch.tensor([[0.0, 0.5], [0.0, -1.0], [0.0, 0.0]]))
    want = base(x) + torch.cat([(x @ a.T) @ b.T for a, b in ab], -1) * torch.tensor([0.5, -1.0, 0.0])[:, None, None]
    assert torch.allclose(layer(x), want, atol=1e-5)
    assert torch.equal(layer(x)[2], base(x)[2])  # strength 0: the base output exactly
    bank.set_rows(torch.ones(20, 2))  # a bigger batch grows the buffer
    assert bank.strengths.shape == (32, 2)


def test_fuse_delta_requantizes_fp8_with_a_new_scale() -> None:
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(32, 32)
    fp8 = FP8Linear(lin, in_amax=4.0, w_amax=float(lin.weight.detach().abs().max()))
    delta = torch.randn(32, 32, generator=g) * 0.5  # grows max |W|: the old scale would saturate
    old_scale = float(fp8.scale_w)
    fuse_delta(fp8, 0, 1, delta)
    w = fp8.weight_t.t().float() * fp8.scale_w
    assert float(fp8.scale_w) > old_scale
    assert fp8.weight_t.dtype == torch.float8_e4m3fn
    assert torch.nn.functional.cosine_similarity(w.flatten(), (lin.weight + delta).flatten(), dim=0) > 0.999


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_fp8_side_path_and_fuse_keep_the_fp32_lora_latent(tiny_medium: Path, tmp_path: Path, capsys) -> None:
    lora = write_peft_lora(tiny_medium, tmp_path / "style.safetensors", std=0.1)
    ref = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)
    amax = max_calibrate(ref.backend.modules["transformer"], lambda m: ref(**KW, progress=False), HIGH_PRECISION)
    ref.load_lora(lora)
    want = ref(**KW, generator=torch.Generator().manual_seed(4), progress=False, loras={"style": 1.0}).images
    plain = ref(**KW, generator=torch.Generator().manual_seed(4), progress=False).images
    fp8 = Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration=amax)
    fp8.load_lora(lora)
    side = fp8(**KW, generator=torch.Generator().manual_seed(4), progress=False, loras={"style": 1.0}).images
    assert any(isinstance(m, LoraLinear) and isinstance(m.base, FP8Linear) for m in fp8.backend.transformer.model.modules())
    fused = Pipeline.from_pretrained(tiny_medium, backend="torch-fp8", device="cpu", calibration=amax)
    fused.load_lora(lora, fuse=True)
    fz = fused(**KW, generator=torch.Generator().manual_seed(4), progress=False).images
    with capsys.disabled():
        print(f"\n[tiny medium final latent cosine vs fp32+LoRA: fp8 side path {_cos(side, want):.5f}, "
              f"fp8 fuse=True {_cos(fz, want):.5f}, fuse vs side {_cos(fz, side):.5f}; "
              f"fp32 LoRA vs no LoRA {_cos(want, plain):.5f}]")
    assert _cos(side, want) >= 0.99 and _cos(fz, want) >= 0.99
    assert _cos(want, plain) < 0.99  # the LoRA matters more than the FP8 error


def test_switching_loras_and_strengths_does_not_recompile(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """torch.compile (dynamo, fullgraph) over the tiny MMDiT: after the LoRAs are loaded, two
    LoRAs x three strengths run on the first compiled graph (a counting backend sees each compile)."""
    path = tiny_models["large"]
    pipe = Pipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
    a = write_peft_lora(path, tmp_path / "a.safetensors", seed=1)
    b = write_peft_lora(path, tmp_path / "b.safetensors", seed=2)
    pipe.load_lora(a, name="a"), pipe.load_lora(b, name="b")
    compiles = []

    def counting(gm, inputs):
        compiles.append(len(gm.graph.nodes))
        return gm.forward

    from torch import _dynamo

    _dynamo.reset()
    model = pipe.backend.modules["transformer"]
    pipe.backend.modules["transformer"] = torch.compile(model, backend=counting, fullgraph=True)
    pipe.backend.bind()
    kw = {**KW, "num_inference_steps": 2}
    outs = []
    for loras in ({"a": 0.5}, {"a": 1.0}, {"a": -0.3}, {"b": 0.5}, {"b": 1.0}, {"b": -0.3}, {"a": 0.2, "b": 0.9}):
        outs.append(pipe(**kw, generator=torch.Generator().manual_seed(0), progress=False, loras=loras).images)
    assert len(compiles) == 1, compiles
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[3])


@pytest.mark.parametrize("name", ["attn.to_qkv", "ff.net.2"])  # catk joins by copy / by pad
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp8_side_path_variants_match_the_plain_side_path(variant: str, name: str) -> None:
    """Every FP8 side-path variant (models/lora_fp8.py) ≈ FP8 base + exact bf16 side path, per row,
    for a fused q/k/v with 2 slots; uninstalling gives the base its own weight back."""
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(64, 3 * 32)
    x = torch.randn(3, 21, 64, generator=g)  # [B, N, in]: M = 63, padded to 64 inside
    base = FP8Linear(lin, in_amax=float(x.abs().max()), w_amax=float(lin.weight.detach().abs().max()))
    want_base = base(x).float()
    bank = LoraBank(slots=2, rank=8, device=torch.device("cpu"), dtype=torch.bfloat16, variant=variant)
    layer = LoraLinear(base, bank, groups=3, name=f"transformer_blocks.0.{name}")
    assert layer.join == ("pad" if name == "ff.net.2" else "copy")
    ab = [(torch.randn(r, 64, generator=g) * 0.1, torch.randn(32, r, generator=g) * 0.03) for r in (4, 8, 6)]
    for grp, (a, b) in enumerate(ab):
        layer.set_slot(1, grp, a, b)
    layer.set_slot(0, 0, torch.randn(3, 64, generator=g), torch.randn(32, 3, generator=g))  # strength 0 below
    bank.set_rows(torch.tensor([[0.0, 0.5], [0.0, -1.0], [0.0, 0.0]]))
    delta = torch.cat([(x @ a.T) @ b.T for a, b in ab], -1) * torch.tensor([0.5, -1.0, 0.0])[:, None, None]
    got = layer(x).float()
    assert got.shape == (3, 21, 96)
    assert _cos(got[:2] - want_base[:2], delta[:2]) > 0.99  # the LoRA part, through FP8 where the variant uses it
    assert _cos(got, want_base + delta) > 0.999
    assert torch.allclose(got[2], want_base[2], atol=0.05 * float(want_base.abs().max()))  # strength 0
    from sd35trt.runtime.models.lora_linear import uninstall

    holder = nn.Sequential(layer)
    assert uninstall(holder) == 1 and holder[0] is base
    assert base.weight_t.is_contiguous() or base.weight_t.t().is_contiguous()
    assert torch.equal(base(x), want_base.to(torch.bfloat16))


def test_fuse_into_a_wrapped_catk_layer_rederives_its_lora() -> None:
    g = torch.Generator().manual_seed(6)
    lin = nn.Linear(32, 32)
    x = torch.randn(2, 16, 32, generator=g)  # [B, N, in]
    base = FP8Linear(lin, in_amax=float(x.abs().max()), w_amax=float(lin.weight.detach().abs().max()))
    bank = LoraBank(slots=1, rank=4, device=torch.device("cpu"), dtype=torch.bfloat16, variant="catk")
    layer = LoraLinear(base, bank)
    a, b = torch.randn(4, 32, generator=g) * 0.1, torch.randn(32, 4, generator=g) * 0.1
    layer.set_slot(0, 0, a, b)
    bank.set_rows(torch.ones(2, 1))
    d = torch.randn(32, 32, generator=g) * 0.5
    fuse_delta(layer, 0, 1, d)  # a new weight scale for the base
    want = x @ (lin.weight + d).T.detach() + lin.bias.detach() + (x @ a.T) @ b.T
    assert _cos(layer(x).float(), want) > 0.999


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp8_variants_switch_loras_and_strengths_without_recompiling(variant: str) -> None:
    """dynamo fullgraph over an FP8 layer with the variant's side path: new LoRA weights (set_slot)
    and new strengths (set_rows) change buffers in place, so the first graph serves them all."""
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(32, 48)
    x = torch.randn(2, 16, 32, generator=g)  # [B, N, in]
    base = FP8Linear(lin, in_amax=float(x.abs().max()), w_amax=float(lin.weight.detach().abs().max()))
    bank = LoraBank(slots=2, rank=4, device=torch.device("cpu"), dtype=torch.bfloat16, variant=variant)
    layer = LoraLinear(base, bank, groups=3)
    compiles = []

    def counting(gm, inputs):
        compiles.append(len(gm.graph.nodes))
        return gm.forward

    from torch import _dynamo

    _dynamo.reset()
    fn = torch.compile(layer, backend=counting, fullgraph=True)
    outs = []
    for seed, rows in ((1, [[1.0, 0.0], [0.5, 0.0]]), (2, [[0.0, 1.0], [0.0, -0.7]]), (3, [[0.3, 0.9], [1.0, 1.0]])):
        gs = torch.Generator().manual_seed(seed)
        for grp in range(3):
            a, b = torch.randn(4, 32, generator=gs) * 0.1, torch.randn(16, 4, generator=gs) * 0.03
            layer.set_slot(seed % 2, grp, a, b)
        bank.set_rows(torch.tensor(rows))
        outs.append(fn(x))
        assert torch.allclose(outs[-1].float(), layer(x).float())  # compiled == eager for the new buffers
    assert len(compiles) == 1, compiles
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_fuse_from_the_source_weight_rounds_once() -> None:
    """With the layer's high-precision weight, fuse re-quantizes W + ΔW once (fresh scale): equal to
    quantizing it directly, and closer to the exact W + ΔW than the twice-rounded fuse."""
    from sd35trt.runtime.models.fp8 import E4M3_MAX, to_e4m3
    from sd35trt.runtime.models.lora_linear import fuse_deltas

    g = torch.Generator().manual_seed(8)
    lin = nn.Linear(256, 3 * 128)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02, generator=g)
    deltas = [(k, 3, torch.randn(128, 8, generator=g) * 0.02 @ torch.randn(8, 256, generator=g) * 0.02)
              for k in (0, 2)]  # q and v of a fused q/k/v
    exact = lin.weight.detach().clone()
    for k, _, d in deltas:
        exact[k * 128:(k + 1) * 128] += d
    once = FP8Linear(lin, in_amax=4.0, w_amax=float(lin.weight.detach().abs().max()))
    twice = FP8Linear(lin, in_amax=4.0, w_amax=float(lin.weight.detach().abs().max()))
    fuse_deltas(once, deltas, lambda: lin.weight.detach())
    fuse_deltas(twice, deltas, lambda: None)  # no source: today's path
    scale = float(exact.abs().max()) / E4M3_MAX
    assert torch.equal(once.weight_t.t(), to_e4m3(exact, scale)) and float(once.scale_w) == pytest.approx(scale)

    def err(layer: FP8Linear) -> float:
        return float((layer.weight_t.t().float() * layer.scale_w - exact).norm() / exact.norm())

    assert err(once) < err(twice)
    w = once.weight_t.t().float() * once.scale_w
    fuse_deltas(once, deltas, lambda: lin.weight.detach())  # a second fuse: from the fused weights, not the source
    for k, _, d in deltas:
        w[k * 128:(k + 1) * 128] += d
    assert torch.equal(once.weight_t.t(), to_e4m3(w, float(w.abs().max()) / E4M3_MAX))


@pytest.mark.parametrize("name", ["attn.to_qkv", "ff.net.2"])
def test_catk_under_inductor_equals_eager(name: str) -> None:
    """The joined-K side path through inductor (its custom ops `lora_down`, `join_columns`,
    `write_columns` inside a LayerNorm/GELU-fed graph) gives the eager output; K_cat is 128-aligned."""
    g = torch.Generator().manual_seed(8)
    lin = nn.Linear(64, 3 * 32)
    x = torch.randn(2, 24, 64, generator=g)  # [B, N, in]
    base = FP8Linear(lin, in_amax=4.0, w_amax=float(lin.weight.detach().abs().max()))
    bank = LoraBank(slots=1, rank=8, device=torch.device("cpu"), dtype=torch.bfloat16, variant="catk")
    layer = LoraLinear(base, bank, groups=3, name=name)
    for grp in range(3):
        layer.set_slot(0, grp, torch.randn(8, 64, generator=g) * 0.1, torch.randn(32, 8, generator=g) * 0.1)
    bank.set_rows(torch.tensor([[1.0], [0.4]]))
    assert layer.k_cat == 128 and layer.w_cat.shape == (96, 128)
    norm = nn.LayerNorm(64)

    def block(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(layer(norm(t) if name == "attn.to_qkv" else torch.nn.functional.gelu(t)))

    from torch import _dynamo

    _dynamo.reset()
    with torch.inference_mode():
        want = block(x).float()
        got = torch.compile(block, fullgraph=True)(x).float()
    assert _cos(got, want) > 0.9999, _cos(got, want)
