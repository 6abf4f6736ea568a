"""An export's ControlNet record: content hash, the residual transformer's record and profiles, and
the refusals (no ControlNet exported, another residual count or width, another ControlNet) made
from config files before any graph loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.components import CONTROLNET, component, engine_profiles, graph_component
from sd35trt.runtime.control_graph import ControlNetRecord, check_fits, check_same, fingerprint, make_record
from sd35trt.runtime.errors import CheckpointError, InvalidInputError
from sd35trt.runtime.manifest import HashCache

pytest.importorskip("diffusers", reason="diffusers (test extra) writes the tiny ControlNets")
from sd35trt.export.tiny_controlnet import write_tiny_controlnet  # noqa: E402


@pytest.fixture(scope="module")
def nets(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cn-record")
    out = {f"r{n}": write_tiny_controlnet(tiny_models["large"], root / f"r{n}", "large", n, seed=n) for n in (2, 3)}
    wide = shutil.copytree(out["r3"], root / "wide")  # 3 heads of 16: width 48, the tiny MMDiT is 32 wide
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3}))
    return {**out, "wide": wide}


def test_the_record_names_the_controlnet_and_its_residuals(tiny_models: dict[str, Path], nets: dict[str, Path],
                                                           tmp_path: Path) -> None:
    t = Checkpoint.open(tiny_models["large"]).config.transformer
    hashes = HashCache(tmp_path)
    rec = make_record(nets["r3"], t, hashes)
    assert rec.residuals == 3 and rec.source == str(nets["r3"].resolve())
    assert ControlNetRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec  # as the manifest stores it
    assert rec.sha256 == fingerprint(nets["r3"]) != fingerprint(nets["r2"])
    assert hashes.get(str((nets["r3"] / "config.json").resolve())) is not None  # a load need not hash it again
    assert rec.net_spec.num_layers == 3 and not rec.net_spec.use_pos_embed


def test_the_residual_transformer_and_the_controlnet_get_engine_profiles(tiny_models: dict[str, Path]) -> None:
    config = Checkpoint.open(tiny_models["large"]).config
    plain = component("transformer")
    cn = graph_component("transformer", 3)
    assert cn.input_names == (*plain.input_names, "controlnet_residuals") and graph_component("transformer") is plain
    shapes = cn.shapes(config, 4, 64, 96)
    assert shapes["controlnet_residuals"] == (3, 4, 4 * 6, config.transformer.inner_dim)  # [R, B, h*w/p^2, D]
    profiles = engine_profiles(config, (64, 64, 128), (1, 1, 2), cfg=True, residuals=3)
    lo, _, hi = profiles["transformer"]["controlnet_residuals"]
    assert lo == (3, 1, 16, 32) and hi == (3, 4, 64, 32)  # the skip pass's [B] rows .. 2 images under CFG at 128
    assert set(profiles["controlnet"]) == set(CONTROLNET.input_names)
    assert "controlnet" not in engine_profiles(config, (64, 64, 64), (1, 1, 1), cfg=True)  # plain sets: unchanged
    assert "controlnet_residuals" not in engine_profiles(config, (64, 64, 64), (1, 1, 1), cfg=True)["transformer"]


def test_refusals_name_the_value_and_the_fix(tiny_models: dict[str, Path], nets: dict[str, Path]) -> None:
    t = Checkpoint.open(tiny_models["large"]).config.transformer
    rec = make_record(nets["r3"], t)
    where, fix = Path("/exports/large"), "sd35trt export --model M --out /exports/large --controlnet X"
    with pytest.raises(InvalidInputError, match=r"exported without a ControlNet.*--controlnet X"):
        check_fits(None, nets["r3"], t, where, fix)
    with pytest.raises(InvalidInputError, match=r"gives 2 residuals.*takes 3.*--controlnet X"):
        check_fits(rec, [nets["r3"], nets["r2"]], t, where, fix)
    with pytest.raises(CheckpointError, match=r"\(48, 2, 16\) does not fit the model's transformer \(32, 2, 16\)"):
        check_fits(rec, nets["wide"], t, where, fix)
    with pytest.raises(CheckpointError, match="neither a folder nor a .safetensors file"):
        check_fits(rec, where / "missing", t, where, fix)
    assert check_same(rec, nets["r3"], t, where, fix).num_layers == 3


def test_another_or_a_changed_controlnet_is_refused(tiny_models: dict[str, Path], nets: dict[str, Path],
                                                   tmp_path: Path) -> None:
    t = Checkpoint.open(tiny_models["large"]).config.transformer
    mine = shutil.copytree(nets["r3"], tmp_path / "mine")
    rec = make_record(mine, t)
    other = write_tiny_controlnet(tiny_models["large"], tmp_path / "other", "large", 3, seed=9)  # same shape
    with pytest.raises(CheckpointError, match=r"is not the ControlNet .* was exported with .*re-export: FIX"):
        check_same(rec, other, t, tmp_path, "FIX")
    weights = mine / "diffusion_pytorch_model.safetensors"
    shutil.copyfile(other / weights.name, weights)  # changed in place since the export
    with pytest.raises(CheckpointError, match="changed since"):
        check_same(rec, mine, t, tmp_path, "FIX", HashCache(tmp_path))


@pytest.mark.parametrize("broadcast", [True, False])
def test_zero_residuals_leave_the_transformer_unchanged(broadcast: bool, tiny_models: dict[str, Path]) -> None:
    """What a residual graph gets on calls without control images (ONNX Runtime: broadcast;
    engines: the full shape, one zero expanded, no memory), through our MMDiT."""
    import torch

    from sd35trt.runtime.backends.base import zero_residuals
    from sd35trt.runtime.models.loader import load_modules

    ckpt = Checkpoint.open(tiny_models["large"])
    mmdit = load_modules(ckpt, ["transformer"], torch.device("cpu"), torch.float32)["transformer"]
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 16, 8, 12, generator=g), torch.tensor([900.0, 300.0]),  # [B, 16, h, w], [B]
            torch.randn(2, 77 + 8, 96, generator=g), torch.randn(2, 80, generator=g))
    zeros = zero_residuals(3, ckpt.config, broadcast)(args[0])
    assert zeros.shape == ((3, 1, 1, 32) if broadcast else (3, 2, 4 * 6, 32)) and not zeros.any()
    assert zero_residuals(None, ckpt.config, broadcast) is None  # a plain graph: no residual input
    with torch.no_grad():
        plain, with_zeros = mmdit(*args), mmdit(*args, controlnet_residuals=zeros)
        moved = mmdit(*args, controlnet_residuals=zeros + 0.5)
    assert torch.equal(plain, with_zeros) and not torch.allclose(plain, moved)
