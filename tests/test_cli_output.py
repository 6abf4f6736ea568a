"""What `make demo`'s commands print, and an export that is killed half-way: in child processes
(`python -m sd35trt`), so third-party warnings really reach stderr as a user sees them.

One FP8 export of the tiny checkpoint (ModelOpt calibration, polygraphy folding, ONNX Runtime
constant folding: every library that used to print) is SIGKILLed while a component is being
written, then finished by a second run; its output, a `generate` on the result and a `--verbose`
re-export are each counted for third-party warning lines.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from sd35trt.cli import main
from sd35trt.runtime.image import read_metadata
from sd35trt.runtime.manifest import HASH_CACHE

pytest.importorskip("modelopt", reason="nvidia-modelopt (export extra) calibrates FP8")
# Lines other libraries print: Python warnings, transformers' "[transformers]" notices, polygraphy's
# "[I]"/"[W]" log, ONNX Runtime's native "[W:onnxruntime:..." log, ModelOpt's prints.
THIRD_PARTY = re.compile(r"warning|warn\(|^\s*\[(transformers|diffusers|[IWE])\]|\[W:onnxruntime|onnxruntime:|"
                         r"Inserted \d+ quantizers|colored' module|polygraphy", re.IGNORECASE)
EXPORT_ARGS = ["--precision", "fp8", "--dtype", "fp32", "--calib-size", "1", "--calib-steps", "2", "--no-t5", "--quiet"]


def third_party_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if THIRD_PARTY.search(line)]


def _sd35trt(*argv: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd35trt", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _finished(out: Path) -> list[str]:
    try:
        return list(json.loads((out / "manifest.json").read_text())["components"])
    except (OSError, ValueError, KeyError):
        return []


@dataclass
class Killed:
    out: Path
    output: str  # stdout + stderr of the killed run
    finished: list[str]  # components its manifest listed when it was killed
    leftovers: list[str]  # hidden temp entries it left
    mtimes: dict[str, int]
    rows: dict[str, str]  # component -> status of the run that finished the export


@pytest.fixture(scope="module")
def killed(tiny_medium: Path, tmp_path_factory: pytest.TempPathFactory) -> Killed:
    from sd35trt.export.calibrate import CalibSettings
    from sd35trt.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("killed") / "onnx"
    proc = subprocess.Popen([sys.executable, "-m", "sd35trt", "export", "--model", str(tiny_medium), "--out", str(out),
                             *EXPORT_ARGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    temps = lambda: [p.name for p in out.glob(".*") if p.is_dir()]  # noqa: E731  a component being written
    deadline = time.monotonic() + 240
    while not (_finished(out) and temps()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no temp folder after a finished component (rc {proc.poll()}): {proc.communicate()[0]}")
        time.sleep(0.005)
    proc.kill()  # SIGKILL: no cleanup handler runs
    output = proc.communicate(timeout=60)[0]
    finished, leftovers = _finished(out), temps()
    mtimes = {c: (out / f"{c}.onnx").stat().st_mtime_ns for c in finished}
    opts = ExportOptions(precision="fp8", dtype="fp32", calib=CalibSettings(num_prompts=1, steps=2), t5=False)
    rows = {r.component: r.status for r in export_model(tiny_medium, out, opts, progress=False)}
    return Killed(out, output, finished, leftovers, mtimes, rows)


def test_a_killed_export_keeps_its_finished_components_and_leaves_no_temp_folder(killed: Killed) -> None:
    assert killed.finished and killed.leftovers, (killed.finished, killed.leftovers)
    assert {c for c, s in killed.rows.items() if s == "cached"} == set(killed.finished)  # not redone
    assert {c for c, s in killed.rows.items() if s == "exported"} == set(killed.rows) - set(killed.finished)
    assert killed.mtimes == {c: (killed.out / f"{c}.onnx").stat().st_mtime_ns for c in killed.finished}
    assert [p.name for p in killed.out.rglob(".*")] == [HASH_CACHE]  # the temp folders and files are gone


def test_demo_commands_print_no_third_party_warnings(killed: Killed, tmp_path: Path) -> None:
    assert third_party_lines(killed.output) == [], killed.output  # calibration, export, folding
    image = tmp_path / "demo.png"
    res = _sd35trt("generate", "--model", killed.out, "--prompt", "a lighthouse on a cliff", "--negative-prompt",
                   "blurry", "--seed", "0", "--steps", "2", "--height", "64", "--width", "64", "--out", image)
    assert res.returncode == 0, res.stderr
    assert third_party_lines(res.stdout + res.stderr) == [], res.stderr
    assert res.stdout.splitlines() == [f"wrote {image} (64x64, seed 0, 2 steps, guidance 4.5, backend onnxruntime)"]
    assert {line.split(":")[0].split(" (")[0] for line in res.stderr.split("\n") if line.strip()} == {"denoise"}  # our bar only ("denoise (euler)")


def test_verbose_brings_the_library_output_back(killed: Killed, tiny_medium: Path) -> None:
    (killed.out / "clip_l.onnx").unlink()  # one component to redo: its export logs as it did before
    res = _sd35trt("--verbose", "export", "--model", tiny_medium, "--out", killed.out, *EXPORT_ARGS)
    assert res.returncode == 0, res.stderr
    seen = third_party_lines(res.stdout + res.stderr)
    with pytest.MonkeyPatch.context():
        print(f"\n[--verbose export: {len(seen)} third-party lines, e.g. {seen[:2]}]", file=sys.__stderr__)
    assert len(seen) >= 3 and "1 exported, 4 unchanged" in res.stdout


def test_out_extension_picks_the_format_with_metadata(onnx_fp32: Path, tmp_path: Path) -> None:
    for name, fmt in (("a.jpg", "JPEG"), ("b.webp", "WEBP"), ("c.png", "PNG")):
        assert main(["generate", "--model", str(onnx_fp32), "--prompt", "a red boat", "--seed", "4", "--steps", "2",
                     "--height", "64", "--width", "64", "--quiet", "--out", str(tmp_path / name)]) == 0
        img = Image.open(tmp_path / name)
        meta = read_metadata(img)
        assert img.format == fmt and meta["sd35trt:seed"] == "4" and meta["sd35trt:prompt"] == "a red boat"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "b.webp", "c.png"]  # nothing else left


def test_generate_torch_fp8_from_the_cli(tiny_medium: Path, onnx_fp8: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fp8.png"
    argv = ["generate", "--model", str(tiny_medium), "--backend", "torch-fp8", "--calibration", str(onnx_fp8),
            "--compile", "off", "--device", "cpu", "--prompt", "an orange cat", "--seed", "2", "--steps", "1",
            "--guidance", "0", "--height", "32", "--width", "32", "--quiet", "--out", str(out)]  # CPU FP8 GEMMs are slow
    assert main(argv) == 0, capsys.readouterr().err
    assert "backend torch-fp8" in capsys.readouterr().out
    meta = read_metadata(Image.open(out))
    assert meta["sd35trt:backend"] == "torch-fp8" and meta["sd35trt:steps"] == "1"


def test_generate_with_a_sampler_and_from_an_image(tiny_medium: Path, tmp_path: Path, capsys) -> None:
    """--sampler, --image/--mask/--strength and --slg reach the pipeline: the CLI's image equals the
    pipeline's for the same arguments and seed, and its metadata names the mode."""
    import numpy as np
    import torch

    from sd35trt.runtime import Pipeline

    src = tmp_path / "in.png"
    Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)).save(src)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16)).save(mask)
    base = ["generate", "--model", str(tiny_medium), "--device", "cpu", "--dtype", "fp32", "--prompt", "a fox",
            "--seed", "5", "--steps", "4", "--height", "64", "--width", "64", "--quiet"]
    cases = {"dpm.png": ["--sampler", "dpmpp_2m"], "edit.png": ["--image", str(src), "--mask", str(mask),
                                                                 "--strength", "0.5"],
             "slg.png": ["--slg", "1,2"]}
    for name, extra in cases.items():
        assert main(base + extra + ["--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
    pipe = Pipeline.from_pretrained(tiny_medium, device="cpu", dtype=torch.float32)
    kw = dict(num_inference_steps=4, height=64, width=64, output_type="np", progress=False)
    want = {"dpm.png": pipe("a fox", sampler="dpmpp_2m", generator=torch.Generator().manual_seed(5), **kw),
            "edit.png": pipe("a fox", image=Image.open(src).convert("RGB"), mask_image=Image.open(mask).convert("L"),
                             strength=0.5, generator=torch.Generator().manual_seed(5), **kw),
            "slg.png": pipe("a fox", skip_guidance_layers=[1, 2], generator=torch.Generator().manual_seed(5), **kw)}
    for name, out in want.items():
        ref = (out.images[0] * 255).round().astype(np.int16)
        got = np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(np.int16)
        assert np.abs(got - ref).max() <= 1, name  # 8-bit rounding
    meta = {name: Image.open(tmp_path / name).text for name in cases}
    assert (meta["dpm.png"]["sd35trt:mode"], meta["dpm.png"]["sd35trt:slg"]) == ("text-to-image", "off")
    assert "sd35trt:strength" not in meta["dpm.png"]
    assert (meta["edit.png"]["sd35trt:mode"], meta["edit.png"]["sd35trt:strength"]) == ("inpainting", "0.5")
    assert meta["slg.png"]["sd35trt:slg"] == "1,2 scale=2.8 start=0.01 stop=0.2"
