"""torch-fp8 engine sets on the CPU: the set a build writes (tiny Large checkpoint), its manifest,
the refusals before loading, the weights' round trip and the backend the manifest picks.
The compile and the warm-up need the GPU (tools/torch_engine_probe.py runs them on the device)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sd35trt.export.torch_engines import build_from_checkpoint, write_set
from sd35trt.runtime import Pipeline
from sd35trt.runtime.backends import backend_limits
from sd35trt.runtime.backends.torch_fp8_set import TorchFP8SetBackend, compile_set_modules
from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.components import RUNTIME
from sd35trt.runtime.engine_manifest import BuildArgs, EngineManifest, EngineSetError, rebuild_command
from sd35trt.runtime.errors import InvalidInputError
from sd35trt.runtime.models.fp8 import HIGH_PRECISION, FP8Linear, fp8_weights_only, max_calibrate
from sd35trt.runtime.models.loader import load_modules
from sd35trt.runtime.torch_engine_set import CACHE, check_set, installed_versions, load_state, skeleton

KW = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", height=64, width=64, num_inference_steps=3,
          output_type="latent", progress=False)
NAMES = [c.name for c in RUNTIME if c.name != "vae_encoder"]


def _modules(ckpt: Checkpoint) -> dict[str, torch.nn.Module]:
    return load_modules(ckpt, NAMES, torch.device("cpu"), torch.bfloat16)


def _amax(ckpt: Checkpoint) -> dict[str, float]:
    config, mmdit = ckpt.config, _modules(ckpt)["transformer"]
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(config.latent_shape(2, 64, 64), generator=g).bfloat16()  # [2, 16, 8, 8]
    ctx = torch.randn(2, config.text_tokens(), config.joint_dim, generator=g).bfloat16()  # [2, 77+T, joint]
    pooled = torch.randn(2, config.pooled_dim, generator=g).bfloat16()  # [2, pooled]
    return max_calibrate(mmdit, lambda m: m(lat, torch.full((2,), 500.0), ctx, pooled), HIGH_PRECISION)


@pytest.fixture(scope="module")
def built(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """(set folder, source checkpoint, calibration) for the tiny Large model, written for sm90."""
    ckpt = Checkpoint.open(tiny_models["large"])
    amax, out = _amax(ckpt), tmp_path_factory.mktemp("torchset") / "tiny-large-fp8-sm90-torch"
    build = BuildArgs(onnx=str(tiny_models["large"]), out=str(out), gpu="sm90", flavor="torch-fp8", dynamic=False,
                      batch=[1, 1], calibration="calib")
    versions = {**installed_versions(), "fa4_version": "4.0.0b36"}
    write_set(_modules(ckpt), amax, ckpt.config, ckpt, out, gpu="sm90", build=build, compile="reduce-overhead",
              attention="flash-attn-4", versions=versions, log=lambda _: None)
    return out, ckpt, amax, versions


def test_the_set_and_its_manifest(built) -> None:
    out, ckpt, _, versions = built
    m = EngineManifest.load(out)
    assert (m.flavor, m.library, m.target, m.precision, m.library_version) == ("torch-fp8", "torch", "sm90", "fp8",
                                                                               torch.__version__)
    assert set(m.components) == set(NAMES) | {CACHE}
    assert m.components[CACHE].flags["fa4_version"] == "4.0.0b36" and m.components[CACHE].bytes > 0
    tf = m.components["transformer"].flags
    assert tf["attention"] == "flash-attn-4" and tf["fp8_layers"] > 0 and tf["compile"] == "reduce-overhead"
    assert m.components["t5"].flags["t5_precision"] == "fp8-weights" and "hf_config" in m.components["clip_g"].flags
    assert {p.name for p in out.iterdir()} >= {"manifest.json", "transformer.safetensors", "compile_cache.safetensors",
                                              "calibration", "tokenizer", "tokenizer_2", "tokenizer_3", "model_index.json"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files
    assert Checkpoint.open(out).default_backend == "torch-fp8"
    assert backend_limits("torch-fp8", Checkpoint.open(out), m.variant).max_batch is None


def test_weights_round_trip_exactly(built) -> None:
    out, ckpt, amax, _ = built
    m = EngineManifest.load(out)
    from sd35trt.export.torch_engines import convert

    ref = convert(_modules(ckpt), amax)
    for comp in NAMES:
        entry = m.components[comp]
        got = load_state(skeleton(comp, m.variant, entry.flags, amax), out / entry.file, torch.device("cpu"))
        want = ref[comp].state_dict()
        assert set(got.state_dict()) == set(want), comp
        for k, v in got.state_dict().items():
            assert v.dtype == want[k].dtype and torch.equal(v.float(), want[k].float()), (comp, k)
    mmdit = load_state(skeleton("transformer", m.variant, m.components["transformer"].flags, amax),
                       out / "transformer.safetensors", torch.device("cpu"))
    fp8 = [x for x in mmdit.modules() if isinstance(x, FP8Linear)]
    assert fp8 and all(x.weight_t.dtype == torch.float8_e4m3fn and x.weight_t.stride(0) == 1 for x in fp8)


def test_pipeline_picks_torch_fp8_from_the_manifest_and_matches_the_backend(built) -> None:
    """Eager on the CPU (compiled artifacts are GPU-only): the set gives the latents the torch-fp8
    backend gives for the same checkpoint and calibration (T5 weight-only FP8 in both)."""
    out, ckpt, amax, _ = built
    pipe = Pipeline.from_pretrained(out, device="cpu", compile=False)
    assert isinstance(pipe.backend, TorchFP8SetBackend) and pipe.backend.name == "torch-fp8"
    ours = pipe(**KW, generator=torch.Generator().manual_seed(3)).images
    ref = Pipeline.from_pretrained(ckpt.path, backend="torch-fp8", device="cpu", calibration=amax, fast_accum=True)
    fp8_weights_only(ref.backend.modules["t5"])
    ref.backend.bind()
    want = ref(**KW, generator=torch.Generator().manual_seed(3)).images
    assert torch.isfinite(ours).all() and torch.equal(ours, want)


def test_compiled_set_is_refused_off_the_gpu(built) -> None:
    with pytest.raises(EngineSetError, match="compile=False"):
        Pipeline.from_pretrained(built[0], device="cpu")


@pytest.mark.parametrize("what", ["gpu", "torch", "triton", "fa4"])
def test_stale_or_foreign_set_is_refused_with_the_rebuild(built, what: str) -> None:
    out, _, _, versions = built
    m = EngineManifest.load(out)
    cc, have = "sm90", dict(versions)
    if what == "gpu":
        cc = "sm100"
    elif what == "torch":
        have["torch_version"] = "9.9.9"
    else:
        have[f"{what}_version"] = "0.0.1"
    with pytest.raises(EngineSetError, match=r"sd35trt build --model .* --calibration calib .*--flavor torch-fp8"):
        check_set(m, out, cc, have)
    check_set(m, out, "sm90", versions)  # the set itself passes


def test_corrupted_or_unfinished_set_is_refused(built, tmp_path: Path) -> None:
    copy = tmp_path / "set"
    shutil.copytree(built[0], copy)
    data = bytearray((copy / "vae_decoder.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "vae_decoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(EngineSetError, match="sha256 differs"):
        Pipeline.from_pretrained(copy, device="cpu", compile=False)
    doc = json.loads((copy / "manifest.json").read_text())
    del doc["components"][CACHE]
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(EngineSetError, match="no compile artifacts"):
        Pipeline.from_pretrained(copy, device="cpu", compile=False)


def test_rebuild_command_of_a_torch_set(built) -> None:
    cmd = rebuild_command(EngineManifest.load(built[0]), gpu="sm100")
    assert cmd.startswith("sd35trt build --model ") and "--calibration calib" in cmd and "--gpu sm100" in cmd


def test_cli_generates_from_the_set_and_checks_the_build_flags(built, tmp_path: Path, capsys) -> None:
    from sd35trt.cli import main

    out, ckpt = built[0], built[1]
    png = tmp_path / "x.png"
    assert main(["generate", "--model", str(out), "--prompt", "a red boat", "--height", "64", "--width", "64",
                 "--steps", "2", "--device", "cpu", "--compile", "off", "--seed", "1", "--out", str(png), "--quiet"]) == 0
    assert png.stat().st_size > 0
    assert main(["generate", "--model", str(out), "--prompt", "x", "--calibration", "c", "--out", str(png)]) == 2
    assert "does not apply to an engine set" in capsys.readouterr().err
    base = ["build", "--flavor", "torch-fp8", "--gpu", "sm90", "--model", str(ckpt.path)]
    assert main(base) == 2 and "--calibration" in capsys.readouterr().err
    assert main(base + ["--calibration", str(out / "calibration"), "--dynamic"]) == 2
    assert "--dynamic" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(base + ["--calibration", str(out / "calibration")]) == 2
        assert "none is visible" in capsys.readouterr().err


def test_the_compile_scope_is_recorded_and_the_loaded_set_compiles_that_way(built, tmp_path: Path, capsys) -> None:
    """A set built with compile_scope="blocks" records it; its rebuild command and the wrappers the
    loader puts on its modules (compile_set_modules, fed the manifest's flags) follow it; a set
    written without it stays one graph. Wrapping is lazy, so this runs on the CPU."""
    from sd35trt.cli import main

    out, ckpt, amax, versions = built
    blocks = tmp_path / "blocks-set"
    build = BuildArgs(onnx=str(ckpt.path), out=str(blocks), gpu="sm90", flavor="torch-fp8", dynamic=False,
                      batch=[1, 1], calibration="calib")
    write_set(_modules(ckpt), amax, ckpt.config, ckpt, blocks, gpu="sm90", build=build, compile="reduce-overhead",
              attention="flash-attn-4", versions=versions, log=lambda _: None, compile_scope="blocks")
    for folder, scope in ((out, "model"), (blocks, "blocks")):
        m = EngineManifest.load(folder)
        flags = m.components["transformer"].flags
        assert flags["compile_scope"] == scope
        assert ("--compile-scope blocks" in rebuild_command(m, folder)) == (scope == "blocks")
        modules = Pipeline.from_pretrained(folder, device="cpu", compile=False).backend.modules
        mmdit = modules["transformer"]
        compile_set_modules(modules, flags, {})
        wrapped = [getattr(b, "_compiled_call_impl", None) is not None for b in mmdit.transformer_blocks]
        if scope == "blocks":
            assert modules["transformer"] is mmdit and all(wrapped)  # each block compiled in place
        else:
            assert isinstance(modules["transformer"], torch._dynamo.eval_frame.OptimizedModule) and not any(wrapped)
    with pytest.raises(InvalidInputError, match="compile_scope='layers'.*--compile-scope"):
        build_from_checkpoint(ckpt.path, blocks / "calibration", tmp_path / "x", gpu="sm90", compile_scope="layers")
    assert not (tmp_path / "x").exists()
    if not torch.cuda.is_available():  # the flag parses and reaches the GPU check
        base = ["build", "--flavor", "torch-fp8", "--gpu", "sm90", "--model", str(ckpt.path)]
        assert main(base + ["--calibration", str(blocks / "calibration"), "--compile-scope", "blocks"]) == 2
        assert "none is visible" in capsys.readouterr().err


def test_fusions_are_recorded_and_applied_by_the_loader(built, tmp_path: Path) -> None:
    """A set written with fusions=("adaln-bank",) records them; the loaded MMDiT has the bank and
    gives the latents of the set without it (same math; seen equal on the CPU); an unknown name is
    refused before any write."""
    out, ckpt, amax, versions = built
    banked = tmp_path / "banked-set"
    build = BuildArgs(onnx=str(ckpt.path), out=str(banked), gpu="sm90", flavor="torch-fp8", dynamic=False,
                      batch=[1, 1], calibration="calib")
    write_set(_modules(ckpt), amax, ckpt.config, ckpt, banked, gpu="sm90", build=build, compile="reduce-overhead",
              attention="flash-attn-4", versions=versions, log=lambda _: None, fusions=("adaln-bank",))
    assert EngineManifest.load(banked).components["transformer"].flags["fusions"] == ["adaln-bank"]
    assert "fusions" not in EngineManifest.load(out).components["transformer"].flags
    pipes = [Pipeline.from_pretrained(f, device="cpu", compile=False) for f in (out, banked)]
    assert [hasattr(p.backend.modules["transformer"], "adaln_bank") for p in pipes] == [False, True]
    one = {**KW, "num_inference_steps": 1}
    a, b = (p(**one, generator=torch.Generator().manual_seed(2)).images.flatten().double() for p in pipes)
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99999
    with pytest.raises(InvalidInputError, match="nope"):
        write_set({}, amax, ckpt.config, ckpt, tmp_path / "bad", gpu="sm90", build=build, compile="reduce-overhead",
                  attention="flash-attn-4", versions=versions, log=lambda _: None, fusions=("nope",))
    assert not (tmp_path / "bad").exists()


def test_a_set_with_t5_calibration_runs_t5_fp8_gemms_as_the_backend(built, tmp_path: Path) -> None:
    """T5's calibration (made by the build when the folder has none: export.torch_engines.set_t5_amax)
    goes into the set beside the MMDiT's; t5's flags say fp8-gemms and the loaded set's T5 gives
    exactly the context of the same T5 converted in memory (models.fp8_text.t5_precision)."""
    from sd35trt.export.torch_engines import set_t5_amax
    from sd35trt.runtime.models.fp8_text import T5_AMAX, FP8TextLinear, load_t5_amax, t5_precision

    _, ckpt, amax, versions = built
    out = tmp_path / "t5-set"
    modules = _modules(ckpt)
    t5_amax = set_t5_amax(modules, ckpt, tmp_path / "no-calibration-here")
    assert t5_amax is not None and t5_amax[1]["made_by"] == "build"
    build = BuildArgs(onnx=str(ckpt.path), out=str(out), gpu="sm90", flavor="torch-fp8", dynamic=False,
                      batch=[1, 1], calibration="calib")
    write_set(modules, amax, ckpt.config, ckpt, out, gpu="sm90", build=build, compile="reduce-overhead",
              attention="flash-attn-4", versions=versions, log=lambda _: None, t5_amax=t5_amax)
    m = EngineManifest.load(out)
    assert m.components["t5"].flags["t5_precision"] == "fp8-gemms"
    assert load_t5_amax(out / "calibration")[0] == pytest.approx(t5_amax[0], rel=1e-7)
    assert (out / "calibration" / T5_AMAX).is_file()
    t5 = Pipeline.from_pretrained(out, device="cpu", compile=False).backend.modules["t5"]
    assert sum(isinstance(x, FP8TextLinear) for x in t5.modules()) > 0
    ref = _modules(ckpt)["t5"]
    t5_precision(ref, t5_amax[0])
    ids = torch.randint(0, 100, (2, 256), generator=torch.Generator().manual_seed(2))  # [2, T]
    with torch.no_grad():
        assert torch.equal(t5(ids), ref(ids))


def test_the_sets_fp8_gemm_follows_the_build(built, tmp_path: Path) -> None:
    """`gemm` is recorded (cuBLAS by default; 'quack' with quack's version). Compiled, a set runs
    the build's GEMM: cuBLAS sets (and sets written before the flag) run cuBLAS anywhere; a quack
    set is refused where quack cannot run or is another version, naming both and the fix. Eager
    (the CPU here), the device's own choice runs: the quack set loads with cuBLAS GEMMs."""
    from sd35trt.runtime.backends.torch_fp8_set import set_gemm
    from sd35trt.runtime.models.fp8_gemm import GemmChoice, quack_version

    out, ckpt, amax, versions = built
    assert EngineManifest.load(out).components["transformer"].flags["gemm"] == "cublas"
    cuda = torch.device("cuda")
    assert set_gemm(out, {}, True, cuda).name == "cublas"  # a set written before the flag
    assert set_gemm(out, {"gemm": "cublas"}, True, cuda, choice=GemmChoice("quack")).name == "cublas"
    q = {"gemm": "quack", "quack_version": "0.6.5"}
    assert set_gemm(out, q, True, cuda, installed="0.6.5", choice=GemmChoice("quack")).name == "quack"
    with pytest.raises(EngineSetError, match=r"quack 0\.7\.0 is installed, the build had 0\.6\.5.*sd35trt\[hopper\]"):
        set_gemm(out, q, True, cuda, installed="0.7.0", choice=GemmChoice("quack"))
    with pytest.raises(EngineSetError, match="compiled with quack FP8 GEMMs.*sm89: the quack FP8 GEMM is configured"):
        set_gemm(out, q, True, cuda, installed="0.6.5", choice=GemmChoice("cublas", "sm89: the quack FP8 GEMM is "
                                                                                     "configured for sm90 only"))
    quacked = tmp_path / "quack-set"
    build = BuildArgs(onnx=str(ckpt.path), out=str(quacked), gpu="sm90", flavor="torch-fp8", dynamic=False,
                      batch=[1, 1], calibration="calib")
    write_set(_modules(ckpt), amax, ckpt.config, ckpt, quacked, gpu="sm90", build=build, compile="reduce-overhead",
              attention="flash-attn-4", versions=versions, log=lambda _: None, gemm="quack")
    flags = EngineManifest.load(quacked).components["transformer"].flags
    assert flags["gemm"] == "quack" and flags["quack_version"] == quack_version()
    pipe = Pipeline.from_pretrained(quacked, device="cpu", compile=False)
    assert pipe.backend.gemm.name == "cublas" and "sm90" in pipe.backend.gemm.reason
    lat = pipe(**{**KW, "num_inference_steps": 1}, generator=torch.Generator().manual_seed(2)).images
    assert torch.isfinite(lat).all()


def test_text_encoders_run_eagerly_in_new_sets_and_as_recorded_in_old_ones(built) -> None:
    """New sets record their text encoders as eager (compiled, dynamo's first trace of the three cost
    23 s of a fresh process's first image on the H200); the loader compiles an encoder only where its
    entry says "default" (sets written before). Wrapping is lazy, so this runs on the CPU."""
    from sd35trt.runtime.backends.torch_fp8_set import TEXT_EAGER

    out = built[0]
    m = EngineManifest.load(out)
    assert all(m.components[c].flags["compile"] == TEXT_EAGER for c in ("clip_l", "clip_g", "t5"))
    flags = m.components["transformer"].flags
    for text in ((), ("clip_g", "t5")):
        modules = Pipeline.from_pretrained(out, device="cpu", compile=False).backend.modules
        compile_set_modules(modules, flags, {}, text)
        compiled = {c for c in ("clip_l", "clip_g", "t5") if getattr(modules[c], "_compiled_call_impl", None)}
        assert compiled == set(text)


def test_the_compile_cache_carries_quack_kernels_and_refuses_other_names(tmp_path: Path) -> None:
    """save_cache / load_cache round-trip torch's artifacts and quack's kernels exactly; a kernel name
    that is not <fingerprint>/<key>.o (a path out of quack's folder) is refused, naming the file."""
    from safetensors.torch import save_file

    from sd35trt.runtime.torch_engine_set import load_cache, save_cache

    fp, key = "a" * 64, "b" * 64
    kernels = {f"{fp}/{key}.o": b"\x7fELF kernel", f"{fp}/{'c' * 64}.o": b""}
    path = save_cache(b"inductor bytes", tmp_path / "compile_cache.safetensors", kernels=kernels)
    assert load_cache(path) == (b"inductor bytes", kernels)
    assert load_cache(save_cache(b"", tmp_path / "empty.safetensors")) == (b"", {})
    bad = tmp_path / "bad.safetensors"
    save_file({"artifacts": torch.zeros(1, dtype=torch.uint8), f"quack/../{key}.o": torch.ones(3, dtype=torch.uint8)},
              str(bad))
    with pytest.raises(EngineSetError, match=r"bad\.safetensors.*<64 hex>/<64 hex>\.o.*\.\./"):
        load_cache(bad)
