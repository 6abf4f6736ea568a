"""ONNX Runtime backend end to end on the tiny medium checkpoint, same loop as torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sd35trt.runtime import BackendError, CheckpointError, Pipeline

pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) runs the exported graphs")
KW = dict(prompt='a poster that says "SD35"', negative_prompt="blurry", height=64, width=96,
          num_inference_steps=6, guidance_scale=4.5)


def _run(pipe: Pipeline, output_type: str = "np", seed: int = 21):
    return pipe(**KW, generator=torch.Generator().manual_seed(seed), output_type=output_type, progress=False).images


def test_fp32_graphs_reproduce_the_torch_image(onnx_fp32: Path, tiny_medium: Path) -> None:
    ours = _run(Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime"))
    ref = _run(Pipeline.from_pretrained(tiny_medium, backend="torch", device="cpu", dtype=torch.float32))
    assert ours.shape == ref.shape == (1, 64, 96, 3)
    assert np.abs(ours - ref).max() <= 5e-5  # seen 3.1e-6


def test_each_sampler_on_the_graphs_reproduces_the_torch_image(onnx_fp32: Path, tiny_medium: Path) -> None:
    kw = dict(KW, height=64, width=64, num_inference_steps=4, output_type="np", progress=False)
    with (Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime") as ort,
          Pipeline.from_pretrained(tiny_medium, backend="torch", device="cpu", dtype=torch.float32) as ref):
        for sampler in ("dpmpp_2m", "dpmpp_2m_sde", "heun"):
            a, b = (p(**kw, generator=torch.Generator().manual_seed(5), sampler=sampler).images for p in (ort, ref))
            assert np.abs(a - b).max() <= 5e-5, sampler  # seen 3.0e-6 / 3.4e-6 / 2.7e-6


def test_fp8_pipeline_close_to_fp32_pipeline(onnx_fp8: Path, onnx_fp32: Path, capsys) -> None:
    a = _run(Pipeline.from_pretrained(onnx_fp8, backend="onnxruntime"), "latent").flatten().double()
    b = _run(Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime"), "latent").flatten().double()
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    with capsys.disabled():
        print(f"\n[fp8 vs fp32 final-latent cosine: {cos:.5f}]")
    assert 1 - cos <= 1e-3  # seen 0.99996 (1 - cos = 4e-5)
    assert not torch.equal(a, b)  # FP8 is really in the graph


def test_variant_and_defaults_come_from_the_manifest(onnx_fp32: Path) -> None:
    pipe = Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime")
    assert pipe.config.family == "medium" and pipe.config.sampling.steps == 40
    assert pipe.backend.t5 is not None


def test_tampered_graph_is_refused(onnx_fp32: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(onnx_fp32, bad)
    (bad / "transformer.onnx").write_bytes(b"not onnx")
    with pytest.raises(CheckpointError, match="transformer.onnx"):
        Pipeline.from_pretrained(bad, backend="onnxruntime")
    manifest = json.loads((onnx_fp32 / "manifest.json").read_text())
    manifest["format"] = "something-else/9"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="re-export"):
        Pipeline.from_pretrained(bad, backend="onnxruntime")


def test_a_failing_run_is_a_backend_error_naming_the_graph(onnx_fp32: Path) -> None:
    pipe = Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime")
    wrong = torch.zeros(1, 3, 8, 8)  # 3 latent channels where the graph needs 16: ONNX Runtime refuses it
    with pytest.raises(BackendError, match=r"vae_decoder.onnx: ONNX Runtime failed on inputs latent\[1, 3, 8, 8\]"):
        pipe.backend.vae_decoder(wrong)
    image = pipe.backend.vae_decoder(torch.zeros(1, 16, 8, 8))  # the session still works
    assert image.shape == (1, 3, 64, 64)


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x5A
    data[at + 1] ^= 0xA5
    path.write_bytes(bytes(data))


def test_flipped_bytes_inside_a_graph_are_refused_naming_the_file(onnx_fp32: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    bad = Path(shutil.copytree(onnx_fp32, tmp_path / "flipped"))
    first = Pipeline.from_pretrained(bad, backend="onnxruntime")  # a copy: every file hashed once, in full
    assert first.backend.verification["unchanged"] == [] and "vae_decoder.onnx" in first.backend.verification["hashed"]
    again = Pipeline.from_pretrained(bad, backend="onnxruntime")  # unchanged files: their stamps vouch
    assert again.backend.verification == {"hashed": [], "unchanged": first.backend.verification["hashed"]}
    _flip(bad / "vae_decoder.onnx")  # two bytes inside the weights, in place: the graph still parses
    ort.InferenceSession(str(bad / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])  # ORT alone takes it
    with pytest.raises(CheckpointError) as err:
        Pipeline.from_pretrained(bad, backend="onnxruntime")
    msg = str(err.value)
    assert f"{bad / 'vae_decoder.onnx'} does not match {bad / 'manifest.json'}" in msg
    source = json.loads((bad / "manifest.json").read_text())["source"]
    assert f"re-export it: sd35trt export --model {source} --out {bad} --precision fp32" in msg  # the folder in use
    with pytest.raises(CheckpointError, match="vae_decoder.onnx does not match"):
        Pipeline.from_pretrained(bad, backend="onnxruntime", verify="full")
    pipe = Pipeline.from_pretrained(bad, backend="onnxruntime", verify=False)  # what the check prevents: other pixels
    assert np.abs(_run(pipe) - _run(first)).max() > 0


def test_external_data_is_hashed_too(onnx_fp32: Path, tmp_path: Path) -> None:
    import onnx

    from sd35trt.runtime.files import sha256_file

    folder = Path(shutil.copytree(onnx_fp32, tmp_path / "external"))
    graph = folder / "vae_decoder.onnx"  # re-saved with its weights beside it, as exports beyond 1 GiB are
    onnx.save(onnx.load(str(graph)), str(graph), save_as_external_data=True, location="vae_decoder.onnx.data",
              all_tensors_to_one_file=True)
    doc = json.loads((folder / "manifest.json").read_text())
    entry = doc["components"]["vae_decoder"]
    entry.update(sha256=sha256_file(graph), data="vae_decoder.onnx.data")
    (folder / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="records no content hash"):  # an entry without the data's hash
        Pipeline.from_pretrained(folder, backend="onnxruntime")
    entry["data_sha256"] = sha256_file(folder / "vae_decoder.onnx.data")
    (folder / "manifest.json").write_text(json.dumps(doc))
    assert _run(Pipeline.from_pretrained(folder, backend="onnxruntime")).shape == (1, 64, 96, 3)
    _flip(folder / "vae_decoder.onnx.data")
    with pytest.raises(CheckpointError, match=r"vae_decoder\.onnx\.data does not match"):
        Pipeline.from_pretrained(folder, backend="onnxruntime")


def test_a_partial_export_is_refused_with_the_command_that_finishes_it(onnx_fp32: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(onnx_fp32, tmp_path / "partial"))
    doc = json.loads((folder / "manifest.json").read_text())
    del doc["components"]["transformer"]  # as an export killed before the transformer was committed
    (folder / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=rf"lists no transformer .*sd35trt export --model .* --out {folder}"):
        Pipeline.from_pretrained(folder, backend="onnxruntime")


@pytest.mark.slow
def test_verifying_a_1_gib_graph_keeps_the_load_within_10_percent(tmp_path: Path, capsys) -> None:
    """A 1 GiB graph (fp32 MatMul weight as external data, as large exports are): sessions created
    with the files hashed alongside vs without the check; best of 3 each, interleaved."""
    import os
    import time

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sd35trt.runtime.backends.ort_backend import open_verified
    from sd35trt.runtime.files import sha256_file
    from sd35trt.runtime.manifest import ExportEntry

    n = 16384  # 16384 x 16384 fp32 = 1 GiB
    weight = numpy_helper.from_array(np.random.default_rng(0).random((n, n), dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(tmp_path / "big.onnx"),
              save_as_external_data=True, location="big.onnx.data", all_tensors_to_one_file=True)
    del weight, graph
    entry = ExportEntry(file="big.onnx", sha256=sha256_file(tmp_path / "big.onnx"), bytes=0, precision="fp32",
                        fingerprint="-", data="big.onnx.data", data_sha256=sha256_file(tmp_path / "big.onnx.data"))

    def load(verify: bool | str) -> float:
        t0 = time.perf_counter()
        sessions, seen = open_verified(tmp_path, {"big": entry}, lambda c, e: ort.InferenceSession(
            str(tmp_path / e.file), providers=["CPUExecutionProvider"]), "fix", verify)
        seconds = time.perf_counter() - t0
        assert seen["hashed" if verify == "full" else "unchanged"] == (["big.onnx", "big.onnx.data"] if verify else [])
        del sessions
        return seconds

    load("full")  # page cache warm for all, and the stamps recorded
    times: dict[object, list[float]] = {False: [], True: [], "full": []}
    for _ in range(3):
        for mode in times:
            times[mode].append(load(mode))
    best = {mode: min(t) for mode, t in times.items()}
    with capsys.disabled():
        print(f"\n[1 GiB graph, {os.cpu_count()} cores: load {best[False]:.2f} s; verified by stamp {best[True]:.2f} s "
              f"({best[True] / best[False] - 1:+.0%}); hashed in full alongside {best['full']:.2f} s "
              f"({best['full'] / best[False] - 1:+.0%})]")
    assert best[True] <= 1.10 * best[False]


def test_controlnet_is_refused_by_an_export_made_without_one(onnx_fp32: Path, tiny_medium: Path, tmp_path: Path) -> None:
    pytest.importorskip("diffusers", reason="diffusers (test extra) writes the tiny ControlNet")
    from sd35trt.export.tiny_controlnet import write_tiny_controlnet
    from sd35trt.runtime import InvalidInputError

    cn = write_tiny_controlnet(tiny_medium, tmp_path / "cn", "instantx", 2, seed=0)
    with pytest.raises(InvalidInputError, match=r"exported without a ControlNet .*sd35trt export .*--controlnet"):
        Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime", controlnet=cn)
