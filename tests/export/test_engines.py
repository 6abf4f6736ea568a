"""`sd35trt build`: all six tiny engines with TensorRT-RTX on the CPU, manifest, staleness, policy."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from sd35trt.cli import main
from sd35trt.export.engines import build_engines, default_out_dir, format_table
from sd35trt.runtime.backends.trt_backend import binding_table
from sd35trt.runtime.components import COMPONENTS
from sd35trt.runtime.engine_manifest import EngineManifest, rebuild_command
from sd35trt.runtime.errors import InvalidInputError
from sd35trt.runtime.files import sha256_file

trt = pytest.importorskip("tensorrt_rtx_bindings", reason="pip install 'sd35trt[trt-rtx]' (CPU AOT builds)")
TARGETS = ("sm89", "sm120")
# Byte 32 of a tensorrt-rtx 1.7.1.116 engine: bit mask of its target (see tests/export/test_trt_build.py).
CC_BIT = {"sm89": 0x08, "sm120": 0x10}


# Expected (min, opt, max) shapes written out by hand for the tiny medium variant, not derived from
# `EngineShapes`/`engine_profiles`: default 128 px = 16x16 latents, positional table up to 512 px,
# 16 latent channels, CLIP 77 tokens, T5 256 tokens, T5 width (joint dim) 96, pooled CLIP-L 32 +
# CLIP-G 48 = 80; Medium uses CFG, which doubles every batch but the VAE's; the transformer's minimum
# batch is the image batch (the skip-layer pass runs the prompts' rows alone), its skip_layers 4 blocks.
def _same(shape: tuple) -> tuple:
    return (shape,) * 3


STATIC_PROFILES = {  # static 128x128, 1 image
    "clip_l": {"input_ids": _same((2, 77))},
    "clip_g": {"input_ids": _same((2, 77))},
    "t5": {"input_ids": _same((2, 256))},
    "transformer": {"hidden_states": ((1, 16, 16, 16), (2, 16, 16, 16), (2, 16, 16, 16)),
                    "timestep": ((1,), (2,), (2,)),
                    "encoder_hidden_states": ((1, 333, 96), (2, 77 + 256, 96), (2, 333, 96)),
                    "pooled_projections": ((1, 80), (2, 80), (2, 80)), "skip_layers": _same((4,))},
    "vae_decoder": {"latent": _same((1, 16, 16, 16))},
    "vae_encoder": {"image": _same((1, 3, 128, 128))},
}
DYNAMIC_PROFILES = {  # 64 / 128 / 192 px (half to 1.5x the default), 1 / 1 / 2 images
    "clip_l": {"input_ids": ((2, 77), (2, 77), (4, 77))},
    "clip_g": {"input_ids": ((2, 77), (2, 77), (4, 77))},
    "t5": {"input_ids": ((2, 256), (2, 256), (4, 256))},
    "transformer": {"hidden_states": ((1, 16, 8, 8), (2, 16, 16, 16), (4, 16, 24, 24)),
                    "timestep": ((1,), (2,), (4,)),
                    "encoder_hidden_states": ((1, 333, 96), (2, 333, 96), (4, 333, 96)),
                    "pooled_projections": ((1, 80), (2, 80), (4, 80)), "skip_layers": _same((4,))},
    "vae_decoder": {"latent": ((1, 16, 8, 8), (1, 16, 16, 16), (2, 16, 24, 24))},
    "vae_encoder": {"image": ((1, 3, 64, 64), (1, 3, 128, 128), (2, 3, 192, 192))},
}


def _onnx_dims(graph: Path) -> dict[str, list[int | str]]:
    """Input name -> dims of an exported graph: an int where fixed, the axis symbol where dynamic."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def _assert_graphs_take(onnx_dir: Path, profiles: dict) -> None:
    """Each ONNX graph has exactly the profiled inputs; a dim a profile varies is a dynamic axis of
    the graph, and a dim the graph fixes is that size at min, opt and max."""
    for comp, profile in profiles.items():
        dims = _onnx_dims(onnx_dir / f"{comp}.onnx")
        assert set(dims) == set(profile), comp
        for name, (lo, opt, hi) in profile.items():
            assert len(dims[name]) == len(lo), (comp, name)
            for i, d in enumerate(dims[name]):
                if lo[i] != hi[i]:
                    assert isinstance(d, str), (comp, name, i, d)
                if isinstance(d, int):
                    assert d == lo[i] == opt[i] == hi[i], (comp, name, i, d)


def _doc(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.engine")}


@pytest.mark.parametrize("cc", TARGETS)
def test_all_six_tiny_engines_build(engines_fp8: dict, cc: str) -> None:
    out, rows = engines_fp8[cc]
    assert [r.component for r in rows] == list(COMPONENTS) == ["clip_l", "clip_g", "t5", "transformer", "vae_decoder",
                                                               "vae_encoder"]
    assert {r.status for r in rows} == {"built"}
    doc = _doc(out)
    assert (doc["format"], doc["flavor"], doc["target"], doc["precision"]) == ("sd35trt-engines/1", "tensorrt-rtx", cc, "fp8")
    for r in rows:
        e, data = doc["components"][r.component], (out / r.file).read_bytes()
        assert data[:4] == b"vtrt" and data[32] == CC_BIT[cc], (r.component, data[:4], hex(data[32]))
        assert (e["sha256"], e["bytes"], e["target"]) == (sha256_file(out / r.file), len(data), cc)
        assert e["library_version"] == trt.__version__ and e["flavor"] == "tensorrt-rtx"
        assert e["build_seconds"] > 0 and e["peak_rss_mib"] > 0 and len(e["onnx_sha256"]) == 64
        assert e["precision"] == ("fp8" if r.component == "transformer" else "fp32")
    # self-contained: tokenizers + model_index.json beside the engines, as an exported folder
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"tokenizer", "tokenizer_2", "tokenizer_3"}
    assert json.loads((out / "model_index.json").read_text())["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    table = format_table(rows)
    assert all(c in table for c in COMPONENTS) and table.count("built") == 6 and "fp8" in table


@pytest.mark.parametrize("cc", TARGETS)
def test_built_networks_are_what_the_backend_binds(engines_fp8: dict, onnx_fp8: Path, cc: str) -> None:
    """Names, dtypes and profile ranges read from each built network == the backend's binding table,
    and the profiles the builder set == the hand-written STATIC_PROFILES."""
    out, rows = engines_fp8[cc]
    doc = _doc(out)
    assert {r.component: dict(r.report.profile) for r in rows} == STATIC_PROFILES
    _assert_graphs_take(onnx_fp8, STATIC_PROFILES)
    for r in rows:
        table = binding_table(r.component, EngineManifest.load(out))  # what TrtBackend binds (COMPONENT_IO + dtype policy + config)
        ins = [(b.name, b.dtype) for b in table if b.is_input]
        outs = [(b.name, b.dtype) for b in table if not b.is_input]
        assert [(t.name, t.dtype) for t in r.report.inputs] == ins, r.component
        assert [(t.name, t.dtype) for t in r.report.outputs] == outs, r.component
        assert dict(r.report.profile) == {b.name: b.profile for b in table if b.is_input}, r.component
        entry = doc["components"][r.component]  # the manifest the runtime reads says the same
        assert [(t["name"], t["dtype"]) for t in entry["inputs"]] == ins
        assert entry["built_profiles"] == entry["profiles"] == {b.name: [list(s) for s in b.profile] for b in table if b.is_input}
    manifest = EngineManifest.load(out)
    transformer = {b.name: b for b in binding_table("transformer", manifest)}
    # 128² static, CFG batch 2; the skip-layer pass runs the prompt's row alone (batch 1), same engine
    assert transformer["hidden_states"].profile == ((1, 16, 16, 16), (2, 16, 16, 16), (2, 16, 16, 16))
    assert transformer["skip_layers"].profile == ((4,),) * 3 and transformer["skip_layers"].dtype == "float32"
    assert transformer["encoder_hidden_states"].profile[1] == (2, 77 + 256, 96)  # 77 CLIP + 256 T5 tokens
    encoder = {b.name: b for b in binding_table("vae_encoder", manifest)}
    assert encoder["image"].profile == ((1, 3, 128, 128),) * 3 and encoder["moments"].dtype == "float32"
    assert transformer["timestep"].dtype == "float32" and binding_table("t5", manifest)[0].dtype == "int64"


def test_second_build_rebuilds_nothing(engines_fp8: dict, onnx_fp8: Path, capsys) -> None:
    out, _ = engines_fp8["sm89"]
    before, manifest = _mtimes(out), (out / "manifest.json").read_text()
    assert main(["build", "--onnx", str(onnx_fp8), "--out", str(out), "--gpu", "sm89", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "0 built, 6 unchanged" in printed and printed.count("unchanged") == 7
    assert _mtimes(out) == before and len(before) == 6
    assert json.loads((out / "manifest.json").read_text())["components"] == json.loads(manifest)["components"]


def test_only_stale_components_are_rebuilt(engines_fp8: dict, onnx_fp8: Path, tmp_path: Path) -> None:
    out = tmp_path / "set"
    shutil.copytree(engines_fp8["sm89"][0], out)
    doc = _doc(out)
    (out / "vae_decoder.engine").write_bytes((out / "vae_decoder.engine").read_bytes()[:1000])  # truncated
    doc["components"]["clip_g"]["library_version"] = "1.6.0.0"  # built by another TensorRT-RTX
    (out / "manifest.json").write_text(json.dumps(doc))
    before = _mtimes(out)
    rows = {r.component: r.status for r in build_engines(onnx_fp8, out, gpu="sm89")}
    assert rows == {"clip_l": "unchanged", "clip_g": "built", "t5": "unchanged", "transformer": "unchanged",
                    "vae_decoder": "built", "vae_encoder": "unchanged"}
    after = _mtimes(out)
    assert {n for n in before if before[n] != after[n]} == {"clip_g.engine", "vae_decoder.engine"}
    assert _doc(out)["components"]["clip_g"]["library_version"] == trt.__version__


@pytest.mark.parametrize("gpu", ["sm86", "sm80"])
def test_fp8_on_a_gpu_without_fp8_is_refused_before_any_work(onnx_fp8: Path, tmp_path: Path, gpu: str) -> None:
    out = tmp_path / "never"
    t0 = time.perf_counter()
    with pytest.raises(InvalidInputError, match=rf"(?s)FP8 export.*{gpu} has no FP8.*--precision fp16\|bf16") as err:
        build_engines(onnx_fp8, out, gpu=gpu)
    assert time.perf_counter() - t0 < 1.0
    assert "sd35trt export --model" in str(err.value) and "--precision bf16" in str(err.value)
    assert not out.exists()


def test_options_a_flavor_lacks_are_refused_before_any_work(onnx_fp8: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(InvalidInputError, match="refit: TensorRT-RTX"):
        build_engines(onnx_fp8, out, gpu="sm89", refit=True)
    with pytest.raises(InvalidInputError, match="timing_cache: TensorRT-RTX makes timing-cache operations no-ops"):
        build_engines(onnx_fp8, out, gpu="sm89", timing_cache=tmp_path / "cache")
    with pytest.raises(InvalidInputError, match=r"'sm90' is not a tensorrt-rtx target.*flavor 'tensorrt'"):
        build_engines(onnx_fp8, out, gpu="sm90")
    with pytest.raises(InvalidInputError, match="min_size=64/max_size=None apply to dynamic engines"):
        build_engines(onnx_fp8, out, gpu="sm89", min_size=64)
    with pytest.raises(InvalidInputError, match="height=1024 is outside custom-medium's range"):
        build_engines(onnx_fp8, out, gpu="sm89", dynamic=True, max_size=1024)  # tiny: up to 512 px
    assert not out.exists()


def test_enterprise_flavor_refuses_a_gpu_other_than_the_local_one(onnx_fp8: Path, tmp_path: Path) -> None:
    import torch

    local = "sm%d%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    other = "sm89" if local != "sm89" else "sm90"
    with pytest.raises(Exception, match=rf"flavor 'tensorrt' builds for the local GPU \({local or 'none visible'}\)"):
        build_engines(onnx_fp8, tmp_path / "never", gpu=other, flavor="tensorrt")
    assert not (tmp_path / "never").exists()


def test_dynamic_engines_cover_the_derived_size_range(onnx_fp8: Path, tmp_path: Path) -> None:
    """Tiny variant (default 128 px, positional embedding up to 512 px): 64..192 px, batch 1-2."""
    out = default_out_dir(onnx_fp8, "sm89", root=tmp_path)
    assert out.name == "custom-medium-fp8-sm89"
    rows = build_engines(onnx_fp8, out, gpu="sm89", dynamic=True, batch=(1, 2))
    doc = _doc(out)
    assert doc["shapes"] == {"dynamic": True, "sizes": [64, 128, 192], "batches": [1, 1, 2], "cfg": True}
    assert {r.component: dict(r.report.profile) for r in rows} == DYNAMIC_PROFILES  # what the builder set
    assert {c: e["built_profiles"] for c, e in doc["components"].items()} == {
        c: {n: [list(s) for s in mom] for n, mom in p.items()} for c, p in DYNAMIC_PROFILES.items()}
    _assert_graphs_take(onnx_fp8, DYNAMIC_PROFILES)
    assert {r.status for r in rows} == {"built"}
    assert "--dynamic --batch 1-2 --min-size 64 --max-size 192" in rebuild_command(doc)


def test_an_interrupted_build_keeps_its_finished_engines(onnx_fp8: Path, tmp_path: Path) -> None:
    """Ctrl-C (KeyboardInterrupt, raised here from the progress callback) before an engine: the
    ones built before it are committed; the next run keeps them and removes what a killed run left."""
    out = tmp_path / "set"

    def stop_at(component: str):
        def progress(comp: str, action: str) -> None:
            if comp == component:
                raise KeyboardInterrupt
        return progress

    with pytest.raises(KeyboardInterrupt):
        build_engines(onnx_fp8, out, gpu="sm89", on_component=stop_at("t5"))
    assert set(_doc(out)["components"]) == {"clip_l", "clip_g"}
    before = _mtimes(out)
    (out / ".t5.engine.k1lled.tmp").write_bytes(b"half an engine")  # what a SIGKILL mid-write leaves
    seen: list[tuple[str, str]] = []

    def record_then_stop(comp: str, action: str) -> None:
        seen.append((comp, action))
        if comp == "transformer":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_engines(onnx_fp8, out, gpu="sm89", on_component=record_then_stop)
    assert seen == [("clip_l", "keep"), ("clip_g", "keep"), ("t5", "build"), ("transformer", "build")]
    assert set(_doc(out)["components"]) == {"clip_l", "clip_g", "t5"}
    assert {k: v for k, v in _mtimes(out).items() if k in before} == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
