"""How the command line fails: every bad flag is one line naming the flag, exit status 2, in well
under 3 s (no model is loaded, torch is not even imported); Ctrl-C is one line and 130; a machine
without CUDA is one line; `serve` checks the path before binding and exits when the model cannot
load. All through the real console entry point (`python -m sd35trt`), in child processes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd35trt.cli import build_parser
from sd35trt.cli_checks import BACKENDS, SAMPLERS
from sd35trt.runtime.manifest import HASH_CACHE

LIMIT_S = 3.0


def _run(argv: list[str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "sd35trt", *map(str, argv)], capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    return res, time.perf_counter() - t0


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def paths(tiny_medium: Path, onnx_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cli-errors")
    (tmp / "x.txt").write_text("not an image")
    return {"tiny": tiny_medium, "onnx": onnx_fp32, "tmp": tmp}


def _generate(p: dict[str, Path], *extra: str, model: str = "tiny") -> list:
    return ["generate", "--model", p[model], "--prompt", "a fox", "--out", p["tmp"] / "x.png", *extra]


# (id, argv from the paths, the flag the message must name)
BAD_FLAGS = [
    ("steps 0", lambda p: _generate(p, "--steps", "0"), "--steps"),
    ("guidance negative", lambda p: _generate(p, "--guidance", "-1"), "--guidance"),
    ("seed negative", lambda p: _generate(p, "--seed", "-1"), "--seed"),
    ("height not a multiple of 16", lambda p: _generate(p, "--height", "100"), "--height 100"),
    ("width beyond the model", lambda p: _generate(p, "--width", "4096"), "--width 4096"),
    ("blank prompt", lambda p: ["generate", "--model", p["tiny"], "--prompt", "  ", "--out", p["tmp"] / "x.png"],
     "--prompt"),
    ("image extension", lambda p: ["generate", "--model", p["tiny"], "--prompt", "a", "--out", p["tmp"] / "x.gif"],
     "--out"),
    ("quality for a PNG", lambda p: _generate(p, "--quality", "80"), "--quality"),
    ("unknown backend", lambda p: _generate(p, "--backend", "tensorflow"), "--backend"),
    ("bad device", lambda p: _generate(p, "--device", "gpu"), "--device"),
    ("missing model", lambda p: ["generate", "--model", p["tmp"] / "nope", "--prompt", "a", "--out", p["tmp"] / "x.png"],
     "--model"),
    ("torch on an export folder", lambda p: _generate(p, "--backend", "torch", model="onnx"), "--backend torch"),
    ("onnxruntime on a checkpoint", lambda p: _generate(p, "--backend", "onnxruntime"), "--backend onnxruntime"),
    ("torch-fp8 without calibration", lambda p: _generate(p, "--backend", "torch-fp8"), "--calibration"),
    ("torch-fp8 bad calibration", lambda p: _generate(p, "--backend", "torch-fp8", "--calibration", p["tmp"]),
     "--calibration"),
    ("compile without torch-fp8", lambda p: _generate(p, "--compile", "default"), "--compile"),
    ("slots without engines", lambda p: _generate(p, "--slots", "2", model="onnx"), "--slots"),
    ("dtype on onnxruntime", lambda p: _generate(p, "--dtype", "bf16", model="onnx"), "--dtype"),
    ("export from an export folder", lambda p: ["export", "--model", p["onnx"], "--out", p["tmp"] / "o"], "--model"),
    ("export calib size 0", lambda p: ["export", "--model", p["tiny"], "--out", p["tmp"] / "o", "--calib-size", "0"],
     "--calib-size"),
    ("build from a checkpoint", lambda p: ["build", "--onnx", p["tiny"], "--gpu", "sm89"], "--onnx"),
    ("build gpu name", lambda p: ["build", "--onnx", p["onnx"], "--gpu", "4090"], "--gpu"),
    ("build compile scope name", lambda p: ["build", "--onnx", p["onnx"], "--gpu", "sm90", "--flavor", "torch-fp8",
                                            "--compile-scope", "layers"], "--compile-scope"),
    ("build compile scope on tensorrt", lambda p: ["build", "--onnx", p["onnx"], "--gpu", "sm90", "--flavor", "tensorrt",
                                                   "--compile-scope", "blocks"], "--compile-scope blocks"),
    ("serve missing model", lambda p: ["serve", "--model", p["tmp"] / "nope", "--port", "0"], "--model"),
    ("serve port", lambda p: ["serve", "--model", p["onnx"], "--port", "70000"], "--port"),
    ("serve engines not a set", lambda p: ["serve", "--engines", p["onnx"], "--port", "0"], "--engines"),
    ("serve max batch", lambda p: ["serve", "--model", p["onnx"], "--max-batch", "0"], "--max-batch"),
    ("unknown sampler", lambda p: _generate(p, "--sampler", "ddim"), "--sampler"),
    ("mask without image", lambda p: _generate(p, "--mask", p["tmp"] / "m.png"), "--mask"),
    ("image not an image", lambda p: _generate(p, "--image", p["tmp"] / "x.txt"), "--image"),
    ("slg not numbers", lambda p: _generate(p, "--slg", "seven"), "--slg"),
]


@pytest.mark.parametrize("case,argv,flag", BAD_FLAGS, ids=[c[0] for c in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_it_within_3_s(paths: dict[str, Path], case: str, argv, flag: str) -> None:
    res, seconds = _run(argv(paths))
    err = _lines(res.stderr)
    assert res.returncode == 2, res.stderr
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert err[0].startswith("sd35trt ") and ": error: " in err[0] and flag in err[0], err[0]
    assert res.stdout == "" and seconds < LIMIT_S, (seconds, err[0])


def test_flag_checks_import_no_torch(paths: dict[str, Path]) -> None:
    """Why a bad flag answers at once: the checks, the config and manifest readers need no torch."""
    code = ("import sys; from pathlib import Path; from sd35trt import cli_checks as c; "
            f"i = c.inspect_model(Path({str(paths['onnx'])!r})); c.check_size(i, 64, 64); c.check_backend(i, None); "
            f"c.inspect_model(Path({str(paths['tiny'])!r})); print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "False", res.stderr


def test_backend_choices_are_the_registered_backends() -> None:
    from sd35trt.runtime.backends import available

    assert sorted(BACKENDS) == available()
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert all(b in help_text for b in BACKENDS) and "export` folder" in help_text


def test_sampler_choices_are_the_runtime_samplers() -> None:
    from sd35trt.runtime.samplers import SAMPLER_NAMES

    assert SAMPLERS == SAMPLER_NAMES


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine where torch sees no CUDA")
def test_device_cuda_without_cuda_is_one_line(paths: dict[str, Path]) -> None:
    res, _ = _run(_generate(paths, "--device", "cuda"))
    err = _lines(res.stderr)
    assert res.returncode == 2 and len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "--device cuda:" in err[0] and "--device cpu" in err[0]


def test_ctrl_c_is_one_line_and_130(tiny_medium: Path, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    proc = subprocess.Popen([sys.executable, "-m", "sd35trt", "export", "--model", str(tiny_medium), "--out", str(out),
                             "--precision", "fp32", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL,
                            # a suite started in the background (`cmd &` without job control) runs with SIGINT
                            # ignored, which children inherit: give the CLI the terminal's default, as a user has
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "manifest.json").is_file():  # the export has begun (checkpoint read, folder set up)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"export did not start (rc {proc.poll()}): {proc.communicate()[1][-2000:]}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert _lines(stderr) == [f"sd35trt export: interrupted; the components finished so far are kept in {out}: "
                              f"run the same command again to do the rest"], stderr
    assert not [p.name for p in out.glob(".*") if p.name != HASH_CACHE]  # an interrupted run cleans up after itself


def test_serve_exits_non_zero_when_the_model_cannot_load(onnx_fp32: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(onnx_fp32, tmp_path / "broken"))
    (broken / "vae_decoder.onnx").write_bytes(b"\x08\x07 not a graph")  # readable manifest, corrupt graph
    res, seconds = _run(["serve", "--model", broken, "--port", "0"], timeout=120)
    assert "http://127.0.0.1:" in res.stdout  # it got as far as binding, then the load failed
    err = _lines(res.stderr)
    assert res.returncode == 1 and len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "vae_decoder.onnx" in err[0] and "sd35trt export --model" in err[0], err[0]


def test_unexpected_errors_are_one_line_and_verbose_shows_the_traceback(tmp_path: Path, capsys) -> None:
    from sd35trt.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"\xff\xfe not utf-8 \xff")
    assert main(["tiny-model", str(tmp_path / "t"), "--corpus", str(corpus)]) == 1
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "UnicodeDecodeError" in err[0] and "--verbose" in err[0], err
    with pytest.raises(UnicodeDecodeError):  # --verbose: the real exception, with its traceback
        main(["tiny-model", str(tmp_path / "t"), "--corpus", str(corpus), "--verbose"])
